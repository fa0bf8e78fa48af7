"""`<run dir>/ftrun.log`: everything the console shows, so a run can be read afterwards.

The workflow prints (steps, tables, figures), libraries log and warn, tqdm draws bars, and child processes
(torchrun workers, the endpoint server while it starts) write to the inherited descriptors. Only a tee at the file
descriptor level sees all of it: fds 1 and 2 are pointed at pipes whose reader threads copy every byte to the
original console and every line to the log. Progress bars redraw a line with carriage returns; the log keeps only
the line's last state, so a 900-step bar is one line there, not 900.

Hydra's own job log handler is switched off (conf/hydra/job_logging/ftrun.yaml): its records reach the console,
hence this log, once.
"""

import codecs
import os
import sys
import threading
from pathlib import Path
from typing import BinaryIO, List, Optional

LOG_NAME = "ftrun.log"


class _Stream:
    """One console descriptor (1 or 2) redirected through a pipe: bytes go on to the console unchanged, lines to
    the shared log."""

    def __init__(self, fd: int, log: "ConsoleLog"):
        self.fd, self.log = fd, log
        self.console = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self.read_end = read_end
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.partial = ""
        self.thread = threading.Thread(target=self._pump, name=f"console-log-fd{fd}", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.read_end, 65536)
            except OSError:
                break
            if not data:
                break
            view = memoryview(data)
            while view:  # the console first: what the user sees must never wait for the file
                try:
                    written = os.write(self.console, view)
                except OSError:
                    break
                view = view[written:]
            self._lines(self.decoder.decode(data))
        self._lines(self.decoder.decode(b"", final=True))
        if self.partial:
            self.log.write_line(_last_state(self.partial))
            self.partial = ""

    def _lines(self, text: str) -> None:
        if not text:
            return
        parts = (self.partial + text).split("\n")
        self.partial = parts.pop()
        for line in parts:
            self.log.write_line(_last_state(line))

    def restore(self) -> None:
        os.dup2(self.console, self.fd)  # closes this process's write end of the pipe: the reader sees EOF ...
        self.thread.join(timeout=2.0)  # ... unless a child that outlives the run still holds it
        if not self.thread.is_alive():
            os.close(self.read_end)
            os.close(self.console)


def _last_state(line: str) -> str:
    """A line redrawn with carriage returns (a progress bar), as it was last shown."""
    if "\r" not in line:
        return line
    shown = [segment for segment in line.split("\r") if segment.strip()]
    return shown[-1].rstrip() if shown else ""


class ConsoleLog:
    """Context manager: tee the console into `path` (appended) while the block runs."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file: Optional[BinaryIO] = None
        self._lock = threading.Lock()
        self._streams: List[_Stream] = []

    def write_line(self, line: str) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write((line + "\n").encode("utf-8"))
                self._file.flush()

    def file_only(self, text: str) -> None:
        """Text for the log alone (a traceback the console gets from Hydra in its own form)."""
        for line in text.rstrip("\n").split("\n"):
            self.write_line(line)

    def __enter__(self) -> "ConsoleLog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab", buffering=0)
        _flush_python_streams()
        self._streams = [_Stream(1, self), _Stream(2, self)]
        return self

    def __exit__(self, *exc) -> None:
        _flush_python_streams()
        for stream in self._streams:
            stream.restore()
        self._streams = []
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass

