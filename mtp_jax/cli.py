"""The shape every command of the project shares (main.py, `python -m mtp_jax.predict`, the converters).

    parser = cli.parser(__file__, __doc__)    # prog from the file's path, help from its docstring
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    with cli.reported(UserError):             # the user's bad input: one `error:` line, exit 2
      ...

`--help` prints the usage with the command's real name (`python -m mtp_jax.predict`, `python
main.py`), the docstring's summary, one line per argument, then the docstring's examples (its
first indented paragraph) and the rest of it. Bad arguments and bad input print one line,
`error: ...`, on stderr and exit with 2, never a traceback. Imports nothing heavy, so `--help`
and argument errors stay fast.
"""

import argparse
import contextlib
import os
import re
import sys

from mtp_jax.errors import UserError

EXIT_BAD_INPUT = 2   # argparse's own exit code for bad arguments
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # holds mtp_jax/, data_pipelines/, main.py


def program(path: str) -> str:
  """The command that runs the file at `path`: `python -m mtp_jax.predict` for
  mtp_jax/predict/__main__.py, `python main.py` for a script beside the packages."""
  rel = os.path.relpath(os.path.abspath(path), ROOT)
  parts = os.path.splitext(rel)[0].split(os.sep)
  if rel.startswith(os.pardir) or len(parts) == 1:
    return f"python {os.path.basename(path)}"
  if parts[-1] == "__main__":
    parts.pop()
  return "python -m " + ".".join(parts)


def split_doc(doc: str) -> tuple[str, str, str]:
  """(summary, examples, details) of a module docstring: the paragraphs before the first indented
  one, that one (the example commands), the paragraphs after it."""
  paragraphs = [p for p in (doc or "").strip("\n").split("\n\n") if p.strip()]
  for i, p in enumerate(paragraphs):
    if all(line[:1].isspace() for line in p.splitlines() if line.strip()):
      examples = re.sub(r"(\S) {6,}(?=[-[])", r"\1 ", p)   # a `\`-continued command: one space, not the indent
      return "\n\n".join(paragraphs[:i]).strip(), examples, "\n\n".join(paragraphs[i + 1:]).strip()
  return "\n\n".join(paragraphs).strip(), "", ""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """The description and epilog as written; each argument's help on its own line, unwrapped."""

  def __init__(self, prog):
    import shutil  # noqa: PLC0415
    super().__init__(prog, max_help_position=40, width=max(shutil.get_terminal_size().columns - 2, 100))

  def _split_lines(self, text, width):
    return [" ".join(text.split())]


class Parser(argparse.ArgumentParser):
  """argparse with the project's convention: errors as one `error:` line and exit 2."""

  def error(self, message):
    fail(f"{message} (see {self.prog} --help)")


def parser(path: str, doc: str, prog: str | None = None, **kwargs) -> Parser:
  """The argument parser of the command in file `path` (pass `__file__`) documented by `doc` (its
  module docstring): see the module docstring. `prog` overrides the name; `kwargs` go to argparse."""
  summary, examples, details = split_doc(doc)
  epilog = "\n\n".join(filter(None, ["examples:\n" + examples if examples else "", details]))
  return Parser(prog=prog or program(path), description=summary, epilog=epilog or None,
                formatter_class=HelpFormatter, **kwargs)


def fail(message: str, code: int = EXIT_BAD_INPUT):
  """Ends the program: `error: message` on stderr, exit `code`."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


@contextlib.contextmanager
def reported(*kinds: type[BaseException]):
  """Errors of these kinds (default: mtp_jax.errors.UserError) raised inside end the program with
  one `error:` line and exit 2."""
  try:
    yield
  except (kinds or (UserError,)) as e:
    fail(str(e))
