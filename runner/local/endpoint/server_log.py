"""The endpoint server's log stays bounded: its stderr (the `<endpoints dir>/<name>.log` file the manager opened)
is rotated once it passes MAX_LOG_BYTES: the current contents move to `<log>.1` (replacing an older one) and the
file starts again, so an endpoint that logs for weeks, or a client that makes it log on purpose, holds at most
about twice the cap on disk. Rotation is checked on each record the server logs through Python's logging."""

import logging
import os
import shutil

MAX_LOG_BYTES = 10 * 1024 * 1024


class RotatingStderrHandler(logging.StreamHandler):
    def __init__(self, max_bytes: int = MAX_LOG_BYTES):
        import sys

        super().__init__(sys.stderr)
        self.max_bytes = max_bytes

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        try:
            if os.fstat(2).st_size > self.max_bytes:
                self.rotate()
        except OSError:
            pass  # stderr is not a file (a terminal, a pipe): nothing grows on disk

    def rotate(self) -> None:
        path = os.readlink("/proc/self/fd/2")
        if not os.path.isfile(path):
            return
        self.flush()
        shutil.copyfile(path, path + ".1")
        os.ftruncate(2, 0)  # the manager opened it for appending: later writes start at the new end


def one_line_disconnect(scope) -> str:
    client = scope.get("client") or ("?", "?")
    return (f"{scope.get('method')} {scope.get('path')} from {client[0]}:{client[1]}: the client disconnected "
            "before its request body arrived")
