"""Checkpoints: the Orbax train-state checkpoints and their one reader (`manager`), the official
PyTorch key layouts (`torch_convert` for the encoder, `full_model` for the whole pretraining
model), and where a run's weights come from (`sources`: any workdir, import folder or PyTorch
file, into a fresh train state). Imports only models, tasks (their declared layouts), parallel,
config and errors: never train, predict, export or import_torch."""
