"""The kinds of problem the user must fix, one class each (bad config, a missing earlier step, impossible compute,
invalid data, missing credentials). `ftrun` prints these as a message, without a traceback, and exits 2 on every
backend; anything else is a bug and keeps its traceback."""


class RunnerError(ValueError):
    pass


class ConfigError(RunnerError):
    """A resolved config that cannot run; the message names the key and what would be right."""


class MissingInput(RunnerError):
    """A step run without what an earlier step makes (run the earlier step too, or point from_run= at a run that
    did)."""


class ComputeError(RunnerError):
    """A compute setting that cannot work on this machine (message: what, why, what would be right, which key)."""
