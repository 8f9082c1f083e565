"""host_memory.release_freed_heap gives freed heap pages back to the system (glibc)."""

import ctypes
import ctypes.util
import sys

import pytest

from mtp_jax.train import host_memory


def _resident_mib() -> float:
  with open("/proc/self/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return int(fields["VmRSS"].split()[0]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc")
def test_freed_fragmented_heap_leaves_the_resident_set():
  libc = ctypes.CDLL(ctypes.util.find_library("c"))
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  block, count = 8192, 20000                      # 160 MiB of small blocks on the main heap
  blocks = [libc.malloc(block) for _ in range(count)]
  for b in blocks:
    ctypes.memset(b, 1, block)                    # resident
  kept = blocks[::64] + [blocks[-1]]              # pins the heap: free() alone cannot shrink it
  for i, b in enumerate(blocks):
    if i % 64 and i != count - 1:
      libc.free(b)
  before = _resident_mib()
  assert host_memory.release_freed_heap()
  after = _resident_mib()
  for b in kept:
    libc.free(b)
  assert before - after > 100, (before, after)
