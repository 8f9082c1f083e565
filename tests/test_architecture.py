"""The layout's rules (docs/DESIGN.md §2), read from the source: no room imports a room above it,
no task is named outside tasks/ and configs/, and no function runs past 60 lines without saying
why in its docstring."""

import ast
import os

from mtp_jax.tasks import TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The rooms, bottom to top: a module may import its own room and the rooms before it.
ROOMS = ("mtp_jax.errors", "mtp_jax.quiet_startup", "mtp_jax.cli",
         "mtp_jax.ops", "mtp_jax.parallel",
         "mtp_jax.models", "mtp_jax.torch_twin", "mtp_jax.metrics",
         "data_pipelines.records", "data_pipelines.augment", "data_pipelines.instances",
         "mtp_jax.tasks",
         "data_pipelines.samrs", "data_pipelines.downstream", "data_pipelines.sources", "data_pipelines.convert",
         "mtp_jax.config", "mtp_jax.experiment", "mtp_jax.checkpoints",
         "mtp_jax.train", "mtp_jax.import_torch", "mtp_jax.export",
         "mtp_jax.predict", "mtp_jax.plan")

# String constants equal to a task's name that are not that task.
NOT_TASK_NAMES = {
    ("mtp_jax/models/heads/retinanet.py", "cls"): "the classification loss component",
    ("mtp_jax/models/detection/roi_head.py", "cls"): "the classification loss component",
    ("data_pipelines/convert.py", "ss"): "mmrotate's single-scale DOTA split",
    ("data_pipelines/downstream/detection_releases.py", "ss"): "mmrotate's single-scale DOTA split",
}
# The PyTorch twin mirrors the original's module, whose decoders are keyed by these names.
MIRRORS_THE_ORIGINAL = ("mtp_jax/torch_twin/",)

MAX_LINES = 60
REASON = "Long because"   # a longer function's docstring says why, in a sentence starting so


def library_files():
  for top in ("mtp_jax", "data_pipelines"):
    for folder, _, names in os.walk(os.path.join(ROOT, top)):
      for name in sorted(names):
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          yield os.path.relpath(path, ROOT), ast.parse(open(path).read(), path)
  yield "main.py", ast.parse(open(os.path.join(ROOT, "main.py")).read())


def room_of(module: str):
  return next((r for r in ROOMS if module == r or module.startswith(r + ".")), None)


def imported_modules(tree):
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield from (f"{node.module}.{a.name}" for a in node.names)


def test_every_library_module_is_in_a_room():
  missing = [path for path, _ in library_files() if path != "main.py" and not path.endswith("__init__.py")
             and room_of(path[:-3].replace("/", ".")) is None]
  assert not missing, missing


def test_no_module_imports_a_room_above_it():
  upward = []
  for path, tree in library_files():
    here = room_of(path[:-3].replace("/", ".").removesuffix(".__init__"))
    if here is None:
      continue
    for module in imported_modules(tree):
      there = room_of(module)
      if there is not None and ROOMS.index(there) > ROOMS.index(here):
        upward.append(f"{path} ({here}) imports {module} ({there})")
  assert not upward, "\n".join(upward)


def test_no_task_is_named_outside_tasks_and_configs():
  named = []
  for path, tree in library_files():
    if path.startswith(("mtp_jax/tasks/", *MIRRORS_THE_ORIGINAL)):
      continue
    for node in ast.walk(tree):
      if isinstance(node, ast.Constant) and node.value in TASKS and (path, node.value) not in NOT_TASK_NAMES:
        named.append(f"{path}:{node.lineno} {node.value!r}")
  assert not named, "\n".join(named)


def test_long_functions_say_why():
  unexplained = []
  for path, tree in library_files():
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_LINES and REASON not in (ast.get_docstring(node) or ""):
          unexplained.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
  assert not unexplained, "\n".join(unexplained)
