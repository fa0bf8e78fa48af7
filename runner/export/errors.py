"""The export's own user-facing error: a RunnerError, so `ftrun` prints it as one clear message."""

from runner.errors import RunnerError


class ExportError(RunnerError):
    pass
