"""What every command-line tool of escape_fast shares.

``run_main(prog, fn)`` runs a tool's work and turns its endings into what a
user and a batch scheduler expect:

* bad input (an escape_fast.errors.UserError, or a path that is missing or
  already exists): ``prog: error: <one line>`` and exit code 2, no
  traceback; any other exception is a bug and keeps its traceback;
* SIGINT (Ctrl-C) or SIGTERM (``kill PID``, schedulers), also when only
  the main process receives it: SIGTERM is turned into an exception like
  Ctrl-C's, so the ``with`` blocks and ``finally`` clauses on the way out
  run: files being written are discarded (escape_fast.files), loader
  workers are shut down, process pools terminated. Then
  ``prog: stopped by SIGTERM`` and exit code 128 + signal (130, 143);
* warnings are printed as ``prog: warning: <message>``, one line each.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import warnings
from collections.abc import Callable

from escape_fast.errors import UserError


class Stopped(KeyboardInterrupt):
    """A stop signal other than SIGINT, raised in the main thread."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_stop_seen = False
_main_pid = None


def _raise_stopped(signum, frame):
    global _stop_seen
    if os.getpid() != _main_pid:  # a forked worker inherited the handler: end the default way, quietly
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _stop_seen = True
    raise Stopped(signum)


def _close_progress_bars():
    """Close the bars a stopped run left open, so that its last line is ours
    (an open bar redraws itself when it is garbage-collected at exit)."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _release(exc: BaseException) -> None:
    """After a stop: free what the unwound frames still hold (data loaders
    and their worker processes) now, quietly. Loader workers that the same
    signal killed are expected, so their loaders' complaints are too."""
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler raises for killed workers
    sys.unraisablehook = lambda unraisable: None  # "Exception ignored in ... __del__" of such loaders
    while exc is not None:
        exc.__traceback__ = None
        exc = exc.__context__
    gc.collect()
    _close_progress_bars()


# Bad input, not a bug: one line, exit 2. A missing or already existing path named on the command
# line is the user's too; every other exception is a bug and keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError)


def split_argument(text: str) -> tuple[int, ...]:
    """An argparse type: an MP-100 split 1..5, or ``all`` (1 to 5)."""
    from escape_fast.data.coco import MP100_SPLITS

    if text == "all":
        return MP100_SPLITS
    if text.isdigit() and int(text) in MP100_SPLITS:
        return (int(text),)
    raise argparse.ArgumentTypeError(f"a split is 1..5 or all, got {text!r}")


def box_argument(text: str) -> list[float] | None:
    """An argparse type: a box ``x,y,w,h`` (four numbers), or ``none`` (the whole image)."""
    if text.lower() == "none":
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"a box is x,y,w,h (four numbers) or none, got {text!r}")
    return values


def run_main(prog: str, fn: Callable[[], int | None]) -> int:
    """Run ``fn()`` (a tool's work, returning its exit code) as described above."""
    global _stop_seen, _main_pid
    _stop_seen, _main_pid = False, os.getpid()
    previous_term = signal.signal(signal.SIGTERM, _raise_stopped)
    previous_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        code = fn()
        return 0 if code is None else int(code)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        _release(exc)
        print(f"{prog}: stopped by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        return 128 + int(signum)
    except USER_ERRORS as exc:
        _close_progress_bars()
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as exc:
        # a loader worker that the same signal killed first (a signal sent to the whole group)
        if _stop_seen or "DataLoader worker" in str(exc) and "killed by signal" in str(exc):
            _release(exc)
            print(f"{prog}: stopped ({str(exc).splitlines()[0]})", file=sys.stderr, flush=True)
            return 128 + signal.SIGTERM
        raise
    finally:
        warnings.showwarning = previous_show
        signal.signal(signal.SIGTERM, previous_term)
