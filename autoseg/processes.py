"""Child processes that end with their parent, however the parent ends.

A parent killed with SIGKILL (or by the out-of-memory killer) runs no cleanup code, so its children must notice
by themselves. A child calls :func:`die_with_parent` first thing: on Linux the kernel then sends it a signal when
the parent exits (``prctl(PR_SET_PDEATHSIG)``), and on every platform a daemon thread checks once a second that
the parent is still its parent (an orphan is re-parented to init or a subreaper) and sends the same signal.

In the parent, :func:`sigterm_raises` makes SIGTERM (what ``kill``, job schedulers and container runtimes send)
unwind the main thread as Ctrl-C does, so ``with`` and ``finally`` blocks stop the children and every file is
either complete or not written (writes are atomic, see :mod:`autoseg.files`).

``python -m autoseg.processes [--parent PID] MODULE [ARG ...]`` runs ``MODULE`` as ``__main__`` in a process tied
to its parent this way: the job runner starts each training job through it, and torchrun each rank.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import runpy
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor

__all__ = ["Terminated", "command_status", "die_with_parent", "sigterm_raises", "tethered_command", "worker_pool"]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwinds like Ctrl-C, so code that saves and stops on KeyboardInterrupt handles both."""


def _set_parent_death_signal(sig: int) -> bool:
    """Ask the Linux kernel to send ``sig`` to this process when its parent exits; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, sig: int, poll_seconds: float, grace_seconds: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_seconds)
    os.kill(os.getpid(), sig)
    time.sleep(grace_seconds)  # still here: the signal was caught and the process did not end
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(
    parent_pid: int,
    *,
    sig: int = signal.SIGTERM,
    poll_seconds: float = 1.0,
    grace_seconds: float = 30.0,
    use_prctl: bool = True,
) -> None:
    """End this process with ``sig`` when its parent, process ``parent_pid``, ends. Call it first thing in a child.

    Parameters
    ----------
    parent_pid : int
        The parent's process id, read by the parent (``os.getpid()``) before it started this process, so that a
        parent that ended before this call is noticed too.
    sig : int, keyword-only
        SIGKILL for processes with nothing to save; SIGTERM for those that should stop cleanly (see
        :func:`sigterm_raises`).
    poll_seconds : float, keyword-only
        How often the fallback thread checks the parent.
    grace_seconds : float, keyword-only
        After sending ``sig``, the fallback thread sends SIGKILL if the process has not ended within this time.
    use_prctl : bool, keyword-only
        False leaves only the fallback thread (tests of the fallback).

    Notes
    -----
    Linux sends the signal when the *thread* that started this process exits, so start children from a thread
    that outlives them (the main thread, or the thread that also stops them).
    """
    if use_prctl:
        _set_parent_death_signal(sig)
    if os.getppid() != parent_pid:  # the parent ended before the kernel was asked to tell us
        os.kill(os.getpid(), sig)
    watch = threading.Thread(
        target=_watch_parent,
        args=(parent_pid, sig, poll_seconds, grace_seconds),
        name="autoseg-parent-watch",
        daemon=True,
    )
    watch.start()


def command_status(body: Callable[[], int]) -> int:
    """Run a command's ``body`` and return its exit status: the body's own, 1 after an AutosegError (printed), 130
    after Ctrl-C and 143 after SIGTERM (128 + the signal, as job schedulers expect), with a line saying so."""
    from autoseg.errors import AutosegError

    try:
        return int(body() or 0)
    except AutosegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print("interrupted; finished work is kept, run the same command again to resume", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130


def _pool_worker_start(parent_pid: int) -> None:
    die_with_parent(parent_pid, sig=signal.SIGKILL)


def worker_pool(max_workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers end with this process, however it ends (they have nothing to save: SIGKILL).

    Use it from the main thread (see :func:`die_with_parent`); every pool in autoseg is made here.
    """
    return ProcessPoolExecutor(max_workers=max_workers, initializer=_pool_worker_start, initargs=(os.getpid(),))


_handler_pid: int | None = None  # the process that installed _raise_terminated


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    if os.getpid() != _handler_pid:  # a child forked (copying the handler) before it set its own: end it
        os.kill(os.getpid(), signum)
        return
    raise Terminated(f"received {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, the first SIGTERM raises :class:`Terminated` in the main thread; a second one kills.

    Does nothing outside the main thread, or when SIGTERM already has a handler (the application's, or an outer
    block's); restores the default when the block ends.
    """
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    global _handler_pid
    _handler_pid = os.getpid()
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:  # (a loader closed by the garbage collector may end the block in another thread)
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGTERM) is _raise_terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def tethered_command(command: Sequence[str], parent_pid: int | None = None) -> list[str]:
    """``[python, "-m", MODULE, *args]`` run through this module, so that it ends with its parent.

    ``parent_pid``: the process that will start it (default: whichever process does, read when it starts).
    """
    if len(command) < 3 or command[1] != "-m":
        raise ValueError(f"expected [python, '-m', module, ...], got {list(command)}")
    parent = ["--parent", str(parent_pid)] if parent_pid is not None else []
    return [command[0], "-m", "autoseg.processes", *parent, *command[2:]]


def _name_parent(args: Sequence[str], pid: int) -> list[str]:
    """The first ``-m autoseg.processes`` in ``args`` (torchrun's command for its ranks) gets ``--parent pid``.

    The process that starts them names itself: a child that read its parent's id when it starts would miss a
    parent killed in the meantime (it would read init's).
    """
    out = list(args)
    for i in range(1, len(out)):
        if out[i - 1 : i + 1] == ["-m", "autoseg.processes"]:
            if out[i + 1 : i + 2] != ["--parent"]:
                out[i + 1 : i + 1] = ["--parent", str(pid)]
            break
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m autoseg.processes [--parent PID] MODULE [ARG ...]``: run MODULE tied to the parent process."""
    parser = argparse.ArgumentParser(prog="python -m autoseg.processes", description=main.__doc__)
    parser.add_argument("--parent", type=int, default=None, help="parent process id (default: the current parent)")
    parser.add_argument("module", help="module to run as __main__, e.g. autoseg.cli")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    options = parser.parse_args(argv)
    die_with_parent(options.parent if options.parent is not None else os.getppid())
    sys.argv = [options.module, *_name_parent(options.args, os.getpid())]
    with sigterm_raises():
        runpy.run_module(options.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    from autoseg.processes import main as _main  # the importable module, not a second copy named __main__

    _main()
