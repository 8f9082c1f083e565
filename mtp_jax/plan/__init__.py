"""Planning on the TPU compiler: compile a config's programs for a TPU slice (from any machine,
with libtpu) and read whether they fit and how fast they can run (`python -m mtp_jax.plan`).

  chips      the TPU generations and the slice names users rent, mapped to compiler topologies
  programs   the training loop's step and evaluation step (and the model's parts) on abstract inputs
  estimate   HBM, flops, bytes and the roofline of a compiled program
  hlo        the compiled program's kernels: where its bytes and flops go
  planner    all of it for one config and slice, as a JSON-able result
"""
