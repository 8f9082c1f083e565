"""Plan a config on a TPU slice: compile its programs and turn the compiler's figures into a fit
verdict and a roofline estimate per chip (a JSON-able dict; `__main__` prints it).

    result = plan(config, "v5p-8")                      # the TPU compiler, no hardware
    result = plan(config, "local", run_steps=10)        # this machine's devices, 10 real steps

For each program (the train step, the evaluation step, and with `parts` the encoder alone and the
train step of each task alone) the result holds: HBM per chip against what the compiler lets a
program use, flops and bytes per run and chip (XLA's cost analysis of the per-chip program), the
roofline time max(flops / peak, bytes / bandwidth), images per second per chip at that time and
the flops utilisation it implies (with the compiler's flops, so rematerialised work counts), and
for the train step the hours of the config's whole schedule (train.num_steps at that time).
"""

import dataclasses
import os
import time

from mtp_jax.errors import UserError
from mtp_jax.experiment import compute_dtype_name
from mtp_jax.ops import target as target_platform
from mtp_jax.plan import chips as chips_lib
from mtp_jax.plan import estimate, hlo
from mtp_jax.plan.programs import Compiled, Experiment, compile_program, single_task_config

GIB = 2 ** 30


@dataclasses.dataclass
class Target:
  """Where the programs are compiled: a TPU slice's devices, or this machine's."""
  name: str
  devices: list
  hosts: int
  chip: chips_lib.Chip | None
  usable_hbm: int | None      # bytes per chip a program may use (None: unknown)
  description: str
  platform: str               # what the programs are traced for ('tpu', 'gpu', 'cpu')
  slice: chips_lib.Slice | None = None


def tpu_target(name: str) -> Target:
  """The devices of TPU slice `name` from the TPU compiler (libtpu), no hardware needed."""
  import importlib.util  # noqa: PLC0415
  if importlib.util.find_spec("libtpu") is None:
    import jax  # noqa: PLC0415
    raise UserError(f"planning for --topology {name} needs the TPU compiler (libtpu), which is not installed: "
                    f"pip install -e '.[tpu]' (libtpu for jax {jax.__version__}; no TPU hardware needed)")
  from jax.experimental import topologies  # noqa: PLC0415
  tpu_slice = chips_lib.resolve(name)
  try:
    devices = list(topologies.get_topology_desc(**tpu_slice.topology_kwargs()).devices)
  except Exception as e:  # noqa: BLE001 (libtpu's own message says what it refused)
    raise UserError(f"--topology {name}: the TPU compiler refused topology {tpu_slice.topology}: "
                    f"{(str(e) or type(e).__name__).splitlines()[0]}") from None
  usable = estimate.usable_hbm(devices[0]) or tpu_slice.chip.hbm_bytes
  hosts = len({d.process_index for d in devices})
  description = (f"{tpu_slice.name} ({tpu_slice.chip.name}, {len(devices)} chips, {hosts} host"
                 f"{'s' if hosts > 1 else ''}; topology {tpu_slice.topology})")
  return Target(tpu_slice.name, devices, hosts, tpu_slice.chip, usable, description, "tpu", tpu_slice)


def local_target() -> Target:
  """This job's own devices (a real TPU host, a GPU or the CPU)."""
  import jax  # noqa: PLC0415
  devices = jax.devices()
  kind = devices[0].device_kind
  chip = chips_lib.chip_of_device_kind(kind) if jax.default_backend() == "tpu" else None
  stats = devices[0].memory_stats() or {}
  usable = stats.get("bytes_limit")
  return Target("local", devices, jax.process_count(), chip, usable,
                f"this machine: {len(devices)} x {kind} ({jax.default_backend()}, {jax.process_count()} "
                f"process{'es' if jax.process_count() > 1 else ''})", jax.default_backend())



def program_figures(compiled: Compiled, target: Target, chips: int, top_k: int = 0) -> dict:
  """The figures of one compiled (or refused) program on `target` (module docstring)."""
  program = compiled.program
  out = {"program": program.name, "lower_s": round(compiled.lower_seconds, 1),
         "compile_s": round(compiled.compile_seconds, 1), "images": program.images,
         "images_per_chip": program.images / chips}
  if compiled.out_of_memory is not None:
    oom = compiled.out_of_memory
    out.update(fits=False, hbm={"needed": oom["needed_bytes"], "available": oom["available_bytes"] or target.usable_hbm},
               refusal=oom["message"])
    return out
  exe = compiled.executable
  memory = estimate.memory(exe)
  out["hbm"] = {**memory, "available": target.usable_hbm}
  out["fits"] = memory["total"] <= target.usable_hbm if target.usable_hbm else None
  cost = estimate.cost(exe)
  kernels, loops = hlo.kernels_and_loops(exe.as_text())
  # XLA counts a loop's body once: add the repeats of the loops whose trip counts are fixed.
  repeats = hlo.loop_repeats(kernels)
  cost["xla_flops"], cost["xla_bytes"] = cost["flops"], cost["bytes"]
  cost["flops"] += repeats["flops"]
  cost["bytes"] += repeats["bytes"]
  cost["loops"] = {"fixed": sum(l["trips"] is not None for l in loops),
                   "run_time": sum(l["trips"] is None for l in loops),
                   "repeat_flops": repeats["flops"], "repeat_bytes": repeats["bytes"]}
  # The share of the bytes in HBM (hlo.py), scaled to the total.
  kernel_bytes = sum(k.bytes for k in kernels)
  cost["hbm_bytes"] = cost["bytes"] * sum(k.hbm_bytes for k in kernels) / kernel_bytes if kernel_bytes else 0.0
  out["cost"] = cost
  if target.chip is not None and cost["flops"] > 0:
    chip = target.chip
    roof = estimate.roofline(cost["flops"], cost["bytes"], chip.peak_bf16_flops, chip.hbm_bytes_per_s)
    roof["hbm_memory_seconds"] = cost["hbm_bytes"] / chip.hbm_bytes_per_s
    out["roofline"] = roof
    out["images_per_s_per_chip"] = program.images / chips / roof["seconds"]
    out["mfu"] = roof["utilization"]
  if top_k:
    out["top"] = {"by_bytes": [k.row() for k in hlo.top(kernels, "bytes", top_k)],
                  "by_flops": [k.row() for k in hlo.top(kernels, "flops", top_k)],
                  "by_scope": hlo.by_scope(kernels)[:top_k],
                  "by_source": hlo.by_source(kernels)[:top_k],
                  "kernels": len(kernels), "kernel_bytes": sum(k.bytes for k in kernels),
                  "kernel_flops": sum(k.flops for k in kernels)}
  return out


def _compile(program, target: Target, log) -> Compiled:
  """compile_program, or a refusal without compiling when the arguments alone cannot fit."""
  if target.usable_hbm and program.argument_bytes > target.usable_hbm:
    message = (f"its arguments alone (parameters, optimizer state and batch) need at least "
               f"{program.argument_bytes / GIB:.2f} GiB per chip")
    log(f"  {program.name}: {message}: not compiled")
    oom = {"needed_bytes": program.argument_bytes, "available_bytes": target.usable_hbm, "message": message}
    return Compiled(program, 0.0, 0.0, out_of_memory=oom)
  log(f"  compiling the {program.name} ...")
  compiled = compile_program(program, target.platform)
  log(f"  {program.name}: lowered in {compiled.lower_seconds:.1f} s, compiled in {compiled.compile_seconds:.1f} s")
  return compiled


def _run_steps(experiment: Experiment, compiled: Compiled, steps: int, log) -> dict:
  """Times `steps` real train steps on real batches of the config's data (after one untimed)."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from data_pipelines import sources  # noqa: PLC0415
  from mtp_jax.train import batching  # noqa: PLC0415
  config = experiment.config
  local = batching.check_batch_size("data.batch_per_subset", config.data.batch_per_subset, experiment.mesh,
                                    config.optimizer.grad_accum_steps)
  batches = sources.source(config).train_batches(config, experiment.tasks, local)
  subsets = tuple(config.data.subsets)
  feed = lambda: batching.device_batch(next(batches), subsets, experiment.mesh, experiment.trainer.fields)
  state = experiment.trainer.init()
  step = compiled.executable
  state, metrics = step(state, feed())
  jax.block_until_ready(metrics)
  device_batches = [feed() for _ in range(steps)]   # read before the clock starts
  log(f"  running {steps} steps ...")
  start = time.perf_counter()
  for batch in device_batches:
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  batches.close()
  loss = float(np.asarray(jax.device_get(metrics["loss"])))
  return {"steps": steps, "seconds_per_step": seconds, "last_loss": loss,
          "images_per_s_per_chip": compiled.program.images / experiment.chips / seconds}


PROGRAMS = ("train", "eval", "encoder")


def _check_request(topology: str, programs, parts: bool, run_steps: int):
  """UserError for a request `plan` cannot serve, before anything is compiled."""
  unknown = [p for p in programs if p not in PROGRAMS]
  if unknown or not programs:
    raise UserError(f"--programs {' '.join(programs)}: choose from {', '.join(PROGRAMS)}")
  if (parts or run_steps) and "train" not in programs:
    raise UserError("--parts and --run need the train step (--programs train ...)")
  if run_steps and topology != "local":
    raise UserError(f"--run times real steps on this machine's devices: use --topology local on the "
                    f"{topology} host itself")


def _dump_hlo(compiled, name: str, folder: str) -> str:
  """Writes the compiled program's optimised HLO to <folder>/<name>.hlo.txt; its path."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, name.replace(" ", "_") + ".hlo.txt")
  with open(path, "w") as f:
    f.write(compiled.executable.as_text())
  return path


def plan(config, topology: str, *, programs=("train", "eval"), parts: bool = False, top_k: int = 0,
         run_steps: int = 0, dump: str | None = None, log=print) -> dict:
  """Compiles `config`'s `programs` (of PROGRAMS: the train step, the evaluation step, the encoder
  alone) for `topology` (a slice name, or 'local') and returns the figures (module docstring).
  Raises UserError for bad input; a program that cannot fit HBM is a result (fits False), not an
  error. dump: a folder to write each compiled program's optimised HLO to (<program>.hlo.txt)."""
  import jax  # noqa: PLC0415
  started = time.perf_counter()
  _check_request(topology, programs, parts, run_steps)
  target = local_target() if topology == "local" else tpu_target(topology)
  config = config.copy_and_resolve_references()
  with target_platform.compiling_for(target.platform):   # 'auto' compute dtype: the target's
    config.model.compute_dtype = compute_dtype_name(config)
  experiment = Experiment(config, target.devices, target.hosts, "eval" in programs)
  chips = experiment.chips
  c = config
  result = {
      "topology": target.name, "description": target.description, "chips": chips, "hosts": target.hosts,
      "mesh": dict(experiment.mesh.shape), "compute_dtype": c.model.compute_dtype, "remat": c.model.remat,
      "tasks": list(experiment.tasks), "subsets": list(c.data.subsets), "image_size": c.data.image_size,
      "batch_per_subset": c.data.batch_per_subset, "train_steps": c.train.num_steps,
      "jax": jax.__version__, "libtpu": _libtpu_version(),
      "chip": dataclasses.asdict(target.chip) if target.chip else None, "usable_hbm": target.usable_hbm,
      "programs": {},
  }
  log(f"planning on {target.description}")
  builders = {"train": experiment.train_program, "eval": experiment.eval_program,
              "encoder": experiment.encoder_program}
  kept = None   # the train step's executable, for --run; every other one is released once read
  for name in programs:
    program = builders[name]()
    compiled = _compile(program, target, log)
    result["programs"][program.name] = program_figures(compiled, target, chips, top_k)
    if dump and compiled.executable is not None:
      result["programs"][program.name]["hlo"] = _dump_hlo(compiled, program.name, dump)
    if name == "train" and run_steps:
      kept = compiled
    del compiled
    _release()
  train = result["programs"].get("train step", {})
  if "roofline" in train:
    train["schedule_hours"] = c.train.num_steps * train["roofline"]["seconds"] / 3600
  if parts:
    result["parts"] = _parts(experiment, target, chips, log, train)
  if run_steps and kept.executable is not None:
    train["measured"] = _run_steps(experiment, kept, run_steps, log)
    if target.chip is not None:
      train["measured"]["mfu"] = train["cost"]["flops"] / train["measured"]["seconds_per_step"] / target.chip.peak_bf16_flops
  result["fits"] = all(p.get("fits") is not False for p in result["programs"].values())
  result["wall_s"] = round(time.perf_counter() - started, 1)
  return result


def _parts(experiment: Experiment, target: Target, chips: int, log, whole: dict) -> list:
  """The encoder alone and each task's train step alone, with the flops and bytes each part adds:
  the encoder's own; a task's: its step minus the encoder (its head, its loss and the optimizer
  update of everything its step trains, the encoder included); then the whole step."""
  rows = []
  encoder = program_figures(_compile(experiment.encoder_program(), target, log), target, chips)
  _release()
  rows.append({"part": "encoder (forward + backward)", **_part_costs(encoder), "attributed": _part_costs(encoder)})
  tasks = list(experiment.tasks)
  if len(tasks) == 1:   # the whole step is that task's step
    own = {k: _minus(_part_costs(whole).get(k), _part_costs(encoder).get(k)) for k in ("flops", "bytes")}
    rows.append({"part": f"train step ({tasks[0]})", **_part_costs(whole), "attributed": own,
                 "attributed_to": f"{tasks[0]} head, loss and optimizer"})
    return rows
  for task in tasks:
    single = Experiment(single_task_config(experiment.config, task), target.devices, target.hosts, False)
    figures = program_figures(_compile(single.train_program(), target, log), target, chips)
    del single
    _release()
    own = {k: _minus(_part_costs(figures).get(k), _part_costs(encoder).get(k)) for k in ("flops", "bytes")}
    rows.append({"part": f"train step, {task} only", **_part_costs(figures), "attributed": own,
                 "attributed_to": f"{task} head, loss and optimizer"})
  # Each task's step alone also updates the encoder's parameters, so the tasks' parts add up to
  # more than the whole step (by about N - 1 encoder updates): the whole step gets no 'adds'.
  rows.append({"part": "whole train step", **_part_costs(whole), "attributed": {},
               "attributed_to": None})
  return rows


def _release():
  """Frees what a compiled program leaves behind (its executable, JAX's trace caches): a paper-scale
  step holds several GB of host memory while it compiles, and --parts compiles five."""
  import gc  # noqa: PLC0415
  import jax  # noqa: PLC0415
  jax.clear_caches()
  gc.collect()


def _part_costs(figures: dict) -> dict:
  out = {"fits": figures.get("fits"), "hbm_total": figures.get("hbm", {}).get("total")}
  if "cost" in figures:
    out.update(flops=figures["cost"]["flops"], bytes=figures["cost"]["bytes"])
  if "roofline" in figures:
    out["roofline_s"] = figures["roofline"]["seconds"]
  return out


def _minus(a, b):
  return None if a is None or b is None else a - b


def _libtpu_version() -> str | None:
  try:
    from importlib.metadata import version  # noqa: PLC0415
    return version("libtpu")
  except Exception:  # noqa: BLE001 (not installed)
    return None
