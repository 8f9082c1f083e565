"""Multi-process setup in one place: `initialize()` starts jax.distributed when a job has several
processes, and a few helpers let processes agree on host-side values.

How the processes are found, first match wins:
1. explicit flags (`main.py --coordinator_address HOST:PORT --num_processes N --process_id I`),
   for GPU or CPU clusters launched by hand or by any scheduler;
2. SLURM (`srun`): SLURM_NTASKS > 1; the process id is SLURM_PROCID, the coordinator is the first
   node of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) on port MTP_COORDINATOR_PORT, default
   12000 + SLURM_JOB_ID % 4096;
3. a Cloud TPU pod slice (TPU_WORKER_HOSTNAMES lists more than one worker): jax.distributed finds
   everything by itself;
4. otherwise one process: nothing to start.
On the CPU backend the cross-process collectives go through gloo.
"""

import dataclasses
import json
import pickle
import os
import re

import jax
import numpy as np
from jax.experimental import multihost_utils

from mtp_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Cluster:
  """How this process joins the job; `source` names where the values came from."""
  source: str                      # 'flags', 'slurm', 'tpu' or 'single'
  coordinator_address: str | None = None
  num_processes: int = 1
  process_id: int = 0


def first_host(nodelist: str) -> str:
  """First host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
  head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
  if not head:
    raise ConfigError(f"cannot read a host from the SLURM node list {nodelist!r}")
  prefix, ranges = head.group(1), head.group(3)
  return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def resolve(coordinator_address=None, num_processes=None, process_id=None, environ=None) -> Cluster:
  """Decides how this process joins the job (see the module docstring); starts nothing."""
  env = os.environ if environ is None else environ
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given):
    if not all(given):
      raise ConfigError("--coordinator_address, --num_processes and --process_id go together")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id {process_id} is not in [0, {num_processes})")
    return Cluster("flags", coordinator_address, num_processes, process_id)
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodes or "SLURM_PROCID" not in env:
      raise ConfigError("SLURM_NTASKS > 1 but SLURM_PROCID or the node list is missing: run the job "
                        "with srun, or pass --coordinator_address/--num_processes/--process_id")
    port = int(env.get("MTP_COORDINATOR_PORT", 12000 + int(env.get("SLURM_JOB_ID", "0")) % 4096))
    return Cluster("slurm", f"{first_host(nodes)}:{port}", int(env["SLURM_NTASKS"]),
                   int(env["SLURM_PROCID"]))
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return Cluster("tpu")
  return Cluster("single")


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> Cluster:
  """Starts jax.distributed if this job has several processes; call before anything uses JAX."""
  cluster = resolve(coordinator_address, num_processes, process_id)
  if cluster.source == "single":
    return cluster
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used by the CPU backend only
  if cluster.source == "tpu":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=cluster.coordinator_address,
                               num_processes=cluster.num_processes, process_id=cluster.process_id)
  return cluster


def _allgather_bytes(data: bytes) -> list[bytes]:
  """[bytes of process 0, bytes of process 1, ...] (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return [data]
  array = np.frombuffer(data, np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([array.size], np.int64)).reshape(-1)
  padded = np.zeros(max(int(sizes.max()), 1), np.uint8)
  padded[:array.size] = array
  rows = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
  return [bytes(row[:n]) for row, n in zip(rows, sizes)]


def allgather_json(value) -> list:
  """[value of process 0, value of process 1, ...] for a JSON-serialisable value."""
  return [json.loads(b.decode()) for b in _allgather_bytes(json.dumps(value, sort_keys=True).encode())]


def allgather_pickle(value) -> list:
  """[value of process 0, value of process 1, ...] for any picklable value (numpy arrays too)."""
  return [pickle.loads(b) for b in _allgather_bytes(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))]


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def barrier(name: str, timeout_s: int = 3600):
  """Waits until every process gets here, through the coordination service (not a device
  collective). Used after compiling: CPU (gloo) collectives give up after 30 s, and processes
  that compile at different speeds would otherwise time out in their first collective."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # noqa: PLC0415 (the client lives here)
  jax_distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)
