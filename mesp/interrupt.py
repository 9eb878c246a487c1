"""Stop at a safe point: the first SIGINT/SIGTERM asks a loop to stop, a second SIGINT aborts at once.

A long loop (mesp.train's steps) runs inside `with StopRequest() as stop:` and looks at `stop.signum` at each
point where stopping loses nothing (a step boundary, where it can write a checkpoint). The first SIGINT or
SIGTERM only records itself there; a second one raises KeyboardInterrupt wherever the program is, as Ctrl-C
does without the guard (writes are atomic, so nothing half-written replaces a good file).

Handlers are installed only in the main thread (Python delivers signals there and refuses to install them
elsewhere) and the previous handlers are restored on exit, so library callers keep theirs.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum: int) -> int:
    """The shell's exit status for a process stopped by `signum` (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


class StopRequest:
    """Context manager: `signum` is None until a SIGINT/SIGTERM arrives, then that signal's number."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt  # the second signal: abort now
        self.signum = signum
        log.warning("%s received: stopping after this step (send it again to abort at once)",
                    signal.Signals(signum).name)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
