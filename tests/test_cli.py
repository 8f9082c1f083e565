"""Every entry point has the same command-line shape (mtp_jax/cli.py): `--help` with the command's
real name, one line per argument and examples; bad input gives one `error:` line and exit 2. The
commands run in child processes, all at once; none needs JAX for this (the mtp_jax ones are
checked not to import it)."""

import os
import re
import subprocess
import sys

import pytest

from mtp_jax import cli
from mtp_jax.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (command, its argv, bad arguments, what the error line says)
ENTRY_POINTS = [
    ("python main.py", ["main.py"], [], "the following arguments are required: --config, --workdir"),
    ("python -m mtp_jax.predict", ["-m", "mtp_jax.predict"], ["--workdir", "w"],
     "the following arguments are required: --input, --out"),
    ("python -m mtp_jax.plan", ["-m", "mtp_jax.plan"], ["--config", "c", "--topology", "v5p-8", "--run", "-1"],
     "--run and --top take a count of 0 or more"),
    ("python -m mtp_jax.export", ["-m", "mtp_jax.export"], ["--workdir", "w", "--out", "encoder.txt"],
     "must end in .pth, .pt or .safetensors"),
    ("python -m mtp_jax.import_torch", ["-m", "mtp_jax.import_torch"],
     ["--ckpt", "a.pth", "--encoder", "vit_b_rvsa", "--img-size", "big", "--out", "o"],
     "argument --img-size: invalid int value: 'big'"),
    ("python -m data_pipelines.convert", ["-m", "data_pipelines.convert"], ["nope", "--root", "r", "--out", "o"],
     "argument DATASET: invalid choice: 'nope'"),
    ("python -m data_pipelines.convert samrs", ["-m", "data_pipelines.convert", "samrs"],
     ["--root", "r", "--out", "o", "--coco-json", "x.json"], "--coco-json holds one subset and split"),
    ("python -m data_pipelines.samrs.convert", ["-m", "data_pipelines.samrs.convert"],
     ["--root", "r", "--out", "o", "--subset", "nope"], "argument --subset: invalid choice: 'nope'"),
    ("python -m data_pipelines.samrs.synthetic", ["-m", "data_pipelines.samrs.synthetic"],
     ["--out", "{tmp}/sample", "--images", "1"], "--images must be at least 2"),
    ("python -m data_pipelines.samrs.coco", ["-m", "data_pipelines.samrs.coco"],
     ["--root", "{tmp}/missing", "--subset", "sota", "--split", "train", "--out", "{tmp}/x.json"],
     "is not a SAMRS tree for subset 'sota'"),   # the user's error, past the arguments
    ("python -m data_pipelines.downstream.synthetic", ["-m", "data_pipelines.downstream.synthetic"], ["eurosat"],
     "the following arguments are required: --out"),
]
IDS = [command.removeprefix("python ").removeprefix("-m ") for command, *_ in ENTRY_POINTS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{(command, "help" | "bad"): (exit code, stdout, stderr)}, the children run in parallel."""
  tmp = str(tmp_path_factory.mktemp("cli"))
  env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": ROOT}
  env.pop("XLA_FLAGS", None)
  procs = {}
  for command, argv, bad, _ in ENTRY_POINTS:
    profile = ["-X", "importtime"] if mtp_jax_command(command) else []
    for case, args in (("help", ["--help"]), ("bad", [a.format(tmp=tmp) for a in bad])):
      procs[command, case] = subprocess.Popen([sys.executable, *(profile if case == "help" else []), *argv, *args],
                                              cwd=ROOT, env=env, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  results = {}
  for key, p in procs.items():
    out, err = p.communicate(timeout=120)
    results[key] = (p.returncode, out, err)
  return results


def mtp_jax_command(command: str) -> bool:
  return "mtp_jax" in command or "main.py" in command


def sections(text: str) -> dict:
  """The help's sections: {"usage": ..., "options": [lines], "positional arguments": [lines], ...}."""
  out, name = {}, "head"
  for line in text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith(":"):
      name = line.rstrip()[:-1]
      out[name] = []
    elif line.startswith("usage:"):
      name = "usage"
      out[name] = [line]
    elif line.strip():
      out.setdefault(name, []).append(line)
    else:
      name = "after"
  return out


@pytest.mark.parametrize("command, argv, bad, says", ENTRY_POINTS, ids=IDS)
def test_help_names_the_command_lists_each_argument_on_a_line_and_gives_examples(runs, command, argv, bad, says):
  code, out, err = runs[command, "help"]
  assert code == 0, err[-2000:]
  assert out.startswith(f"usage: {command} ["), out[:300]
  parts = sections(out)
  assert parts["options"][0].split() == ["-h,", "--help", "show", "this", "help", "message", "and", "exit"]
  for line in parts["options"] + parts.get("positional arguments", []):   # one line each, with its help
    assert line.startswith("  ") and not line.startswith("   "), line
    assert re.match(r"  \S.*?\S {2,}\S", line), line                   # the argument, a gap, its help
  # `convert samrs` shows the SAMRS converter's own examples (the same command)
  example = "python -m data_pipelines.samrs.convert" if command.endswith(" samrs") else command
  assert parts["examples"] and all(line.startswith(f"    {example} ") for line in parts["examples"]), parts["examples"]
  assert "__main__" not in out
  if mtp_jax_command(command):   # the mtp_jax commands: --help imports no JAX (the import-time lines are on stderr)
    imported = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")}
    assert imported and not any(m == "jax" or m.startswith("jax.") for m in imported)


@pytest.mark.parametrize("command, argv, bad, says", ENTRY_POINTS, ids=IDS)
def test_bad_input_gives_one_error_line_and_exit_2(runs, command, argv, bad, says):
  code, out, err = runs[command, "bad"]
  assert code == 2, (out + err)[-2000:]
  assert len(err.strip().splitlines()) == 1, err
  assert err.startswith("error: ") and says in err, err
  assert "Traceback" not in err


def test_program_names_the_module_or_the_script():
  assert cli.program(os.path.join(ROOT, "mtp_jax", "predict", "__main__.py")) == "python -m mtp_jax.predict"
  assert cli.program(os.path.join(ROOT, "data_pipelines", "samrs", "coco.py")) == "python -m data_pipelines.samrs.coco"
  assert cli.program(os.path.join(ROOT, "main.py")) == "python main.py"


def test_docstrings_split_into_summary_examples_and_details():
  doc = """Does a thing.
In two lines.

    python -m x --a 1
    python -m x --b \
        --c 2   # a continued line, as a module docstring holds it

More.

Even more.
"""
  summary, examples, details = cli.split_doc(doc)
  assert summary == "Does a thing.\nIn two lines."
  assert examples == "    python -m x --a 1\n    python -m x --b --c 2   # a continued line, as a module docstring holds it"
  assert details == "More.\n\nEven more."
  assert cli.split_doc("Only a summary.") == ("Only a summary.", "", "")


def test_reported_errors_end_the_program_with_one_line(capsys):
  with pytest.raises(SystemExit) as exit_info:
    with cli.reported():
      raise DataError("'/x' is not a folder")
  assert exit_info.value.code == 2 and capsys.readouterr().err == "error: '/x' is not a folder\n"
  with pytest.raises(ValueError):   # not of the kinds named: a bug, with its traceback
    with cli.reported(DataError):
      raise ValueError("bug")
  with pytest.raises(SystemExit) as exit_info:
    cli.parser(__file__, "Test.\n\n    python -m tests.test_cli --n 1\n").parse_args(["--n", "1"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "error: unrecognized arguments: --n 1 (see python -m tests.test_cli --help)\n"
