"""Errors that mean "the user's input is wrong": the CLIs print their message alone, no traceback."""


class UserError(Exception):
  """Bad input from the user (config, data, workdir). The message says what and where."""


class ConfigError(UserError):
  """A config file that is missing, unreadable, or holds unknown or invalid keys."""


class DataError(UserError):
  """A data folder or file that is not what it should be."""


class CheckpointError(UserError):
  """A checkpoint that does not belong to the configured model, or cannot be read."""


class Preempted(Exception):
  """The run received SIGTERM (a preemption notice) and saved a checkpoint at `step` before stopping."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"stopped by SIGTERM at step {step}; checkpoint saved in {directory}; "
                     "rerun the same command to continue")
    self.step = step
