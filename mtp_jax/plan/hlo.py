"""Where a compiled program's bytes and flops go: its kernels read from the optimised HLO text.

`kernels(hlo_text)` lists every kernel the program launches (a fusion, or an unfused op such as a
copy, a gather or a collective) in the computations that run: the entry, and the bodies of its
loops and conditionals, a loop's kernels counted `known_trip_count` times when the compiler
knows it. For each:
  bytes   operands read + results written at the kernel's boundary (what stays on chip inside a
          fusion is free) with the padding of their tiled layouts (an f32[N, 4] is stored as
          N x 128), as XLA's `bytes accessed` counts them; a kernel that reads a slice of an
          operand is charged the whole operand, so sums differ from XLA's total by some percent;
  hbm_bytes  the part of them that lives in HBM: the TPU compiler keeps some buffers in on-chip
          memory (layouts marked S(1), filled by copy-start / copy-done prefetches), and XLA's
          `bytes accessed` counts their traffic too;
  flops   of its matrix units only: 2 x output elements x contracted size for every dot and
          convolution inside it (elementwise work is left out);
  scope   the model's name scope (`encoder/blocks.3/attn`, `ss`, `optimizer`) from the kernel's
          op_name, with the pass: forward, backward (the transpose of the forward) or other;
  source  the innermost Python frame the compiler recorded (file:line function).
`top(kernels, key, k)`, `by_scope(kernels)` and `by_source(kernels)` rank and group them. These are the compiler's own
kernels, so they show what the TPU executes, not what the model code wrote.
"""

import dataclasses
import json
import math
import re

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
               "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}
# Ops that move nothing themselves (their work is elsewhere, or they are views).
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
        "call", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency"}

_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")


@dataclasses.dataclass
class Kernel:
  name: str
  opcode: str          # fusion kind (kLoop, kOutput, kInput, kCustom) or the op's opcode
  bytes: float         # operands + results, every memory space (as XLA's `bytes accessed`)
  hbm_bytes: float     # the part of them in HBM
  flops: float
  count: int           # times it runs per program run (loop trip counts)
  scope: str
  stage: str           # forward, backward or other
  primitive: str       # the jax primitive it comes from (the op_name's last part)
  source: str

  def row(self) -> dict:
    return dataclasses.asdict(self)


def _array_bytes(dtype: str, dims: tuple, layout: str) -> float:
  """Bytes of one array as laid out in memory: a TPU layout `{minor..major:T(8,128)(2,1)}` pads
  the most-minor dimensions up to its first tile (an f32[1000, 5] lives as 1000 x 128)."""
  order = re.match(r"([0-9,]*)", layout)
  minor_to_major = [int(d) for d in order.group(1).split(",") if d] if order else []
  tile = re.search(r"T\(([0-9,]+)\)", layout)
  if not tile or len(minor_to_major) != len(dims):
    return DTYPE_BYTES[dtype] * math.prod(dims)
  tile_dims = [int(t) for t in reversed(tile.group(1).split(","))]   # most-minor first
  minor_first = [dims[axis] for axis in minor_to_major]
  minor_first += [1] * (len(tile_dims) - len(minor_first))   # a scalar still fills a tile
  padded = [-(-size // t) * t if i < len(tile_dims) else size
            for i, (size, t) in enumerate(zip(minor_first, tile_dims + [1] * len(minor_first)))]
  return DTYPE_BYTES[dtype] * math.prod(padded)


def shape_bytes(shape: str, hbm_only: bool = False) -> float:
  """Bytes of an HLO shape string, an array `f32[8,128]{1,0:T(8,128)}` or a tuple of them, with
  the padding of the layout's tiles. hbm_only: arrays the compiler placed in on-chip memory
  (`S(1)` in the layout: prefetched by copy-start / copy-done) count 0."""
  total = 0.0
  for match in re.finditer(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?", shape):
    dtype, dims, layout = match.group(1), match.group(2), (match.group(3) or "{}")[1:-1]
    if dtype not in DTYPE_BYTES or (hbm_only and re.search(r"S\([1-9]\)", layout)):
      continue
    total += _array_bytes(dtype, tuple(int(d) for d in dims.split(",") if d), layout)
  return total


def array_dims(shape: str) -> tuple:
  match = _ARRAY.search(shape)
  return tuple(int(d) for d in match.group(2).split(",") if d) if match else ()


def _split_shape(text: str) -> tuple[str, str]:
  """'(f32[2], s32[]) while(...' -> ('(f32[2], s32[])', 'while(...')."""
  text = text.strip()
  if text.startswith("("):
    depth = 0
    for i, ch in enumerate(text):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return text[:i + 1], text[i + 1:].strip()
  shape, _, rest = text.partition(" ")
  return shape, rest.strip()


def _matched(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  stack = []
  for i in range(start, len(text)):
    ch = text[i]
    if ch in pairs:
      stack.append(pairs[ch])
    elif stack and ch == stack[-1]:
      stack.pop()
      if not stack:
        return i + 1
  return len(text)


@dataclasses.dataclass
class _Instruction:
  name: str
  shape: str
  opcode: str
  operands: list       # names of the instructions it reads
  attrs: str           # what follows its operand list
  literal: str = ""    # the text inside its parentheses (a constant's value)
  root: bool = False


def _parse_instruction(line: str) -> _Instruction | None:
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  name, rest = match.group(2), match.group(3)
  shape, rest = _split_shape(rest)
  paren = rest.find("(")
  if paren < 0:
    return None
  opcode = rest[:paren].strip()
  end = _matched(rest, paren)
  inside = rest[paren + 1:end - 1]
  operands = re.findall(r"%([\w.\-]+)", inside)
  return _Instruction(name, shape, opcode, operands, rest[end:], inside.strip(), bool(match.group(1)))


def parse_module(text: str) -> tuple[dict, dict]:
  """({computation: [instruction]}, {stack frame id: 'file:line function'}) of HLO module text."""
  computations, current, entry = {}, None, None
  sections, section = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}, None
  for line in text.splitlines():
    stripped = line.strip()
    if stripped in sections:
      section = stripped
      continue
    if section and re.match(r"^\d+ ", stripped):
      key, _, value = stripped.partition(" ")
      sections[section][int(key)] = value
      continue
    section = None
    if current is None:
      header = _HEADER.match(line)
      if header and not line.startswith(" ") and "HloModule" not in line:
        current = header.group(2)
        computations[current] = []
        if header.group(1):
          entry = current
      continue
    if stripped == "}":
      current = None
      continue
    instruction = _parse_instruction(line)
    if instruction is not None:
      computations[current].append(instruction)
  computations["__entry__"] = entry
  return computations, _frames(sections)


def _frames(sections: dict) -> dict:
  """{stack frame id: 'path:line function'}: each frame's own location (the text gives no
  usable parent links)."""
  files = {k: json.loads(v) for k, v in sections["FileNames"].items()}
  functions = {k: json.loads(v) for k, v in sections["FunctionNames"].items()}
  locations = {}
  for k, v in sections["FileLocations"].items():
    fields = dict(re.findall(r"(\w+)=(\d+)", v))
    path = files.get(int(fields.get("file_name_id", 0)), "?")
    for marker in ("/mtp_jax/", "/data_pipelines/", "/site-packages/"):
      if marker in path:
        path = path[path.index(marker) + 1:].removeprefix("site-packages/")
        break
    locations[k] = f"{path}:{fields.get('line', '?')} {functions.get(int(fields.get('function_name_id', 0)), '?')}"
  out = {}
  for k, v in sections["StackFrames"].items():
    fields = dict(re.findall(r"(\w+)=(\d+)", v))
    out[k] = locations.get(int(fields.get("file_location_id", 0)), "?")
  return out


def _scope(attrs: str) -> tuple[str, str, str]:
  """(scope, stage, primitive) from an instruction's op_name metadata, e.g.
  'jit(step)/transpose(jvp(encoder))/blocks.3/dot_general' -> ('encoder/blocks.3', 'backward',
  'dot_general')."""
  match = re.search(r'op_name="([^"]*)"', attrs)
  if not match:
    return "", "other", ""
  stage, names = "other", []
  for part in match.group(1).split(";")[0].split("/"):   # a fused kernel may list several op names
    if part.startswith("jit("):
      continue
    if "->" in part:   # jnp.einsum's scope is its equation
      continue
    if "transpose(" in part:
      stage = "backward"
    elif "jvp(" in part and stage == "other":
      stage = "forward"
    name = re.sub(r"^(?:[\w-]+\()+", "", part).rstrip(")")
    if name and name not in REMAT_SCOPES:
      names.append(name)
  primitive = names.pop() if names else ""
  return "/".join(_without_repeats(names)), stage, primitive


# The scopes jax.checkpoint adds around a rematerialised function: not a part of the model.
REMAT_SCOPES = ("checkpoint", "rematted_computation")


def _without_repeats(names: list) -> list:
  """A path whose run of names repeats at once (remat's 'encoder/blocks.3/encoder/blocks.3/attn')
  with the repeat dropped."""
  i = 0
  while i < len(names):
    for length in range((len(names) - i) // 2, 0, -1):
      if names[i:i + length] == names[i + length:i + 2 * length]:
        del names[i + length:i + 2 * length]
        break
    else:
      i += 1
  return names


def _window_positions(out: int, size: int, stride: int, pad_lo: int, lhs_dilate: int, rhs_dilate: int,
                      length: int) -> int:
  """(output position, kernel tap) pairs of one spatial axis whose input is real, not padding."""
  dilated = (length - 1) * lhs_dilate + 1
  count = 0
  for o in range(out):
    for k in range(size):
      index = o * stride + k * rhs_dilate - pad_lo
      count += 0 <= index < dilated and index % lhs_dilate == 0
  return count


def _convolution_flops(instruction: "_Instruction", shapes: dict) -> float:
  """2 x multiply-adds of a convolution, counting only taps on real input (as XLA does)."""
  lhs = array_dims(shapes.get(instruction.operands[0], ""))
  rhs = array_dims(shapes.get(instruction.operands[1], ""))
  out = array_dims(instruction.shape)
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.attrs)
  if not (lhs and rhs and out and labels) or [len(lhs), len(rhs), len(out)] != [len(l) for l in labels.groups()]:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  window = re.search(r"window=\{([^}]*)\}", instruction.attrs)
  fields = dict(re.findall(r"(\w+)=([0-9x_\-]+)", window.group(1))) if window else {}
  spatial = [c for c in rhs_l if c.isdigit()]
  def per_axis(key, default):
    values = fields.get(key)
    return [int(v) for v in values.split("x")] if values else [default] * len(spatial)
  strides, lhs_dil, rhs_dil = per_axis("stride", 1), per_axis("lhs_dilate", 1), per_axis("rhs_dilate", 1)
  pads = [int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields else [0] * len(spatial)
  taps = 1
  for i, axis in enumerate(spatial):
    taps *= _window_positions(out[out_l.index(axis)], rhs[rhs_l.index(axis)], strides[i], pads[i],
                              lhs_dil[i], rhs_dil[i], lhs[lhs_l.index(axis)])
  batch_groups = lhs[lhs_l.index("b")] // max(out[out_l.index("b")], 1)
  return 2.0 * out[out_l.index("b")] * out[out_l.index("f")] * taps * rhs[rhs_l.index("i")] * max(batch_groups, 1)


def _matmul_flops(instruction: "_Instruction", shapes: dict) -> float:
  if instruction.opcode == "dot":
    out = math.prod(array_dims(instruction.shape))
    lhs = array_dims(shapes.get(instruction.operands[0], ""))
    contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instruction.attrs)
    dims = [int(d) for d in contracting.group(1).split(",") if d] if contracting else []
    return 2.0 * out * math.prod(lhs[d] for d in dims if d < len(lhs))
  if instruction.opcode == "convolution":
    return _convolution_flops(instruction, shapes)
  return 0.0


def _fused_flops(computations: dict, name: str, seen=None) -> float:
  seen = seen if seen is not None else set()
  if name in seen or name not in computations:
    return 0.0
  seen.add(name)
  body = computations[name]
  shapes = {i.name: i.shape for i in body}
  total = 0.0
  for instruction in body:
    total += _matmul_flops(instruction, shapes)
    for called in re.findall(r"calls=%([\w.\-]+)", instruction.attrs):
      total += _fused_flops(computations, called, seen)
  return total


def kernels(text: str) -> list[Kernel]:
  """Every kernel of the running computations of HLO module `text` (module docstring)."""
  found, _ = kernels_and_loops(text)
  return found


def kernels_and_loops(text: str) -> tuple[list[Kernel], list[dict]]:
  """(kernels, loops): `kernels(text)`, and every while loop run: {name, trips (None: not known
  before it runs, counted once), scope, count (times the loop itself runs)}."""
  computations, frames = parse_module(text)
  entry = computations.pop("__entry__")
  out, loops = [], []

  def visit(name: str, count: int, stack: tuple):
    if name not in computations or name in stack:
      return
    body = computations[name]
    shapes = {i.name: i.shape for i in body}
    for ins in body:
      if ins.opcode == "while":
        n = trip_count(computations, body, ins)
        loops.append({"name": ins.name, "trips": n, "scope": _scope(ins.attrs)[0], "count": count})
        n = n or 1
        for key in ("condition", "body"):
          called = re.search(key + r"=%([\w.\-]+)", ins.attrs)
          if called:
            visit(called.group(1), count * n, stack + (name,))
        continue
      if ins.opcode in ("conditional", "call") or "branch_computations" in ins.attrs:
        for called in re.findall(r"(?:to_apply|true_computation|false_computation)=%([\w.\-]+)", ins.attrs):
          visit(called, count, stack + (name,))
        branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
        for called in re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else ():
          visit(called, count, stack + (name,))
        continue
      if ins.opcode in FREE:
        continue
      if ins.opcode.endswith("-done"):   # the wait of an asynchronous copy: its start moved the bytes
        continue
      results = _results(ins)
      moved = sum(shape_bytes(r) for r in results) + sum(shape_bytes(shapes.get(o, "")) for o in ins.operands)
      in_hbm = (sum(shape_bytes(r, True) for r in results)
                + sum(shape_bytes(shapes.get(o, ""), True) for o in ins.operands))
      flops = _matmul_flops(ins, shapes)
      kind = ins.opcode
      if ins.opcode == "fusion":
        called = re.search(r"calls=%([\w.\-]+)", ins.attrs)
        flops += _fused_flops(computations, called.group(1)) if called else 0.0
        fusion_kind = re.search(r"kind=(\w+)", ins.attrs)
        kind = f"fusion {fusion_kind.group(1)}" if fusion_kind else "fusion"
      scope, stage, primitive = _scope(ins.attrs)
      frame = re.search(r"stack_frame_id=(\d+)", ins.attrs)
      source = frames.get(int(frame.group(1)), "") if frame else ""
      out.append(Kernel(ins.name, kind, moved * count, in_hbm * count, flops * count, count, scope, stage, primitive, source))

  if entry:
    visit(entry, 1, ())
  return out, loops


def _results(ins: _Instruction) -> list:
  """The shapes an instruction writes: an asynchronous copy-start's tuple is (destination,
  source, context), of which it writes the destination."""
  if ins.opcode == "copy-start" and ins.shape.startswith("("):
    return [ins.shape[1:].split("}", 1)[0] + "}"]
  return [ins.shape]


def _constant(body: list, name: str, depth: int = 0) -> int | None:
  """The integer value of instruction `name` of `body` if it is a constant (through copies)."""
  ins = next((i for i in body if i.name == name), None)
  if ins is None or depth > 4:
    return None
  if ins.opcode == "constant":
    return int(ins.literal) if re.fullmatch(r"-?\d+", ins.literal) else None
  if ins.opcode in ("copy", "convert", "bitcast") and ins.operands:
    return _constant(body, ins.operands[0], depth + 1)
  return None


def trip_count(computations: dict, caller: list, loop: _Instruction) -> int | None:
  """Iterations of a while loop: the compiler's known_trip_count, else read from the loop's form
  `for (i = start; i < limit; i += 1)` (a counter in the loop tuple compared with a constant in
  the condition and incremented by the constant 1 in the body); None when neither gives it."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
  if known:
    return int(known.group(1))
  cond = re.search(r"condition=%([\w.\-]+)", loop.attrs)
  body = re.search(r"body=%([\w.\-]+)", loop.attrs)
  if not (cond and body and cond.group(1) in computations and body.group(1) in computations):
    return None
  condition, step = computations[cond.group(1)], computations[body.group(1)]
  root = next((i for i in condition if i.opcode == "compare" and "direction=LT" in i.attrs), None)
  if root is None or len(root.operands) != 2:
    return None
  counter = next((i for i in condition if i.name == root.operands[0] and i.opcode == "get-tuple-element"), None)
  limit = _constant(condition, root.operands[1])
  if counter is None or limit is None:
    return None
  index = int(re.search(r"index=(\d+)", counter.attrs).group(1))
  root_tuple = next((i for i in step if i.root and i.opcode == "tuple"), None)
  if root_tuple is None or index >= len(root_tuple.operands):
    return None
  increment = next((i for i in step if i.name == root_tuple.operands[index]), None)
  if increment is None or increment.opcode != "add" or len(increment.operands) != 2:
    return None
  if 1 not in (_constant(step, increment.operands[0]), _constant(step, increment.operands[1])):
    return None
  init = next((i for i in caller if i.name == (loop.operands[0] if loop.operands else "")), None)
  if init is None or init.opcode != "tuple" or index >= len(init.operands):
    return None
  start = _constant(caller, init.operands[index])
  return max(limit - start, 0) if start is not None else None



def loop_repeats(found: list[Kernel]) -> dict:
  """{"flops", "bytes"} that XLA's cost analysis leaves out: it counts a loop's body once, so
  each kernel run `count` times adds count - 1 more runs (loops of fixed trip count)."""
  return {key: sum(getattr(k, key) * (1 - 1 / k.count) for k in found) for key in ("flops", "bytes")}


def top(found: list[Kernel], key: str, k: int) -> list[Kernel]:
  """The `k` kernels with the most `key` ('bytes' or 'flops')."""
  return sorted(found, key=lambda kern: getattr(kern, key), reverse=True)[:k]


def collapse(scope: str) -> str:
  """Block and level numbers folded: 'encoder/blocks.3/attn' -> 'encoder/blocks.*/attn'."""
  return re.sub(r"\.\d+(?=/|$)", ".*", scope) or "(no scope)"


def by_scope(found: list[Kernel]) -> list[dict]:
  """Bytes and flops summed per collapsed scope and stage, most bytes first."""
  groups = {}
  for kern in found:
    key = (collapse(kern.scope), kern.stage)
    g = groups.setdefault(key, {"scope": key[0], "stage": key[1], "bytes": 0.0, "hbm_bytes": 0.0,
                                "flops": 0.0, "kernels": 0})
    g["bytes"] += kern.bytes
    g["hbm_bytes"] += kern.hbm_bytes
    g["flops"] += kern.flops
    g["kernels"] += kern.count
  return sorted(groups.values(), key=lambda g: g["bytes"], reverse=True)


def by_source(found: list[Kernel]) -> list[dict]:
  """Bytes and flops summed per Python line (the kernel's recorded source), most bytes first."""
  groups = {}
  for kern in found:
    g = groups.setdefault(kern.source or "(no source)", {"source": kern.source or "(no source)", "bytes": 0.0,
                                                         "hbm_bytes": 0.0, "flops": 0.0, "kernels": 0})
    g["bytes"] += kern.bytes
    g["hbm_bytes"] += kern.hbm_bytes
    g["flops"] += kern.flops
    g["kernels"] += kern.count
  return sorted(groups.values(), key=lambda g: g["bytes"], reverse=True)
