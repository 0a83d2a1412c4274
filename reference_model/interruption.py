"""Ctrl-C, SIGTERM and SIGHUP as exceptions that a library cannot make disappear.

The CLI turns each signal into an exception in the main thread (KeyboardInterrupt, or `Terminated`), so the
code running unwinds and removes what it was writing. A library can swallow that exception (onnxruntime's
import, for one, reports an interruption as ImportError, which an optional import would ignore). Measured: an
export sent Ctrl-C while tracing (`tests/test_interruptions.py`'s loop, two side by side) ran on and exited 0
with its artifact written, once in 16 tries. So the signal is also recorded here, and whatever publishes a result
(`staging_folder`, `write_atomically`) or starts a new step (`Progress.step`) calls `raise_if_signalled` first:
a swallowed signal is raised again there, and the command still stops, with nothing left behind.

Only a process that `install`s the handlers records signals (the CLI does); elsewhere the checks do nothing.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so cleanup handlers run as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _handler(signum: int, frame) -> None:
    _received.append(signum)
    raise _stop(signum)


def install() -> dict[int, object]:
    """Record and raise on each of SIGNALS from now on (main thread only); returns the handlers replaced."""
    _received.clear()
    return {signum: signal.signal(signum, _handler) for signum in SIGNALS}


def restore(previous: dict[int, object]) -> None:
    """Put back the handlers `install` replaced and forget what was recorded: a later `raise_if_signalled` (a
    library call in the same process, a test) must not see this command's signal."""
    _received.clear()
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def signalled() -> int | None:
    """The first signal received since `install`, or None."""
    return _received[0] if _received else None


def raise_if_signalled() -> None:
    """Raise the first recorded signal's exception again (a library may have swallowed it)."""
    signum = signalled()
    if signum is not None:
        raise _stop(signum)
