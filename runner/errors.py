"""The one base class of problems the user must fix (bad config, impossible compute, invalid data, missing
credentials). `ftrun` prints these as a message, without a traceback, and exits non-zero; anything else is a bug
and keeps its traceback."""


class RunnerError(ValueError):
    pass
