"""Stop signals that work however the runner was started.

A process started as a background job of a non-interactive shell (`cmd &`, `nohup`, some CI runners and job
control) inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler: a Ctrl-C, or a
`kill -INT` from whoever started it, would never reach the code that deletes a kept-alive endpoint. So wherever the
runner keeps something alive it installs its own handlers for SIGINT, SIGTERM and SIGHUP (a closed terminal) for
that stretch, each raising KeyboardInterrupt(<signal name>), and restores the previous ones afterwards.
"""

import signal
import sys
from contextlib import contextmanager
from typing import Dict, Iterator, Sequence

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _name(signum: int) -> str:
    return signal.Signals(signum).name


@contextmanager
def stop_raises_interrupt(signals: Sequence[signal.Signals] = STOP_SIGNALS, *, who: str = "ftrun"
                          ) -> Iterator[Dict[signal.Signals, object]]:
    """Within the block each of `signals` raises KeyboardInterrupt("SIGINT" / "SIGTERM" / "SIGHUP") in the main
    thread, whatever the inherited disposition was (ignored included). After the first one, a repeated signal only
    says the cleanup is under way: it must not cut short the cleanup the first one started. The previous handlers
    are back when the block ends. Outside the main thread nothing is installed (signals belong to its owner).

    Yields the previous handlers (empty when nothing was installed)."""
    previous: Dict[signal.Signals, object] = {}

    def again(signum, frame):
        print(f"{who}: {_name(signum)} again: still cleaning up", file=sys.stderr, flush=True)

    def stop(signum, frame):
        for sig in previous:
            signal.signal(sig, again)
        raise KeyboardInterrupt(_name(signum))

    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, stop)
    except ValueError:  # not the main thread: leave whatever was installed as it was
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        previous.clear()
    try:
        yield dict(previous)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def handled_by(handler, signals: Sequence[signal.Signals]) -> Iterator[None]:
    """`handler` for `signals` within the block, the previous handlers after it (main thread only)."""
    previous = {}
    try:
        for sig in signals:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
