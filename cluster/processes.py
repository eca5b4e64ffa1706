"""Process bookkeeping for what a command starts: stop it and wait for it, even when the command is SIGKILLed.

Imports only psutil, so that the reaper (`python processes.py PID` with a pipe on its stdin) starts in a blink.

Why a reaper: Ray kills its GCS, raylet and dashboard when the process that started them dies (they
share its fate through the kernel), but not the dashboard and runtime-env agents that the raylet
starts: each sees the raylet die at once, then waits up to 60 s to tell the (dead) GCS about it before
it exits (`publish_error_to_driver`'s fixed timeout in Ray 2.60; no setting shortens it). The reaper
notes every descendant of the command while it runs and, once the command is gone, stops the ones left.
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterable

import psutil

POLL_S = 2.0  # how often the reaper notes the command's descendants (a process tree walk: ~10 ms)
DISMISS = b"done"  # what a command that stopped its processes itself writes to its reaper before closing


def descendants(roots: Iterable[psutil.Process]) -> list[psutil.Process]:
    """roots and everything they started, those still running."""
    found: dict[int, psutil.Process] = {}
    for root in roots:
        with contextlib.suppress(psutil.Error):
            if root.is_running():
                found[root.pid] = root
                found.update({p.pid: p for p in root.children(recursive=True)})
    return list(found.values())


def stop(processes: Iterable[psutil.Process], grace_s: float = 10.0) -> list[psutil.Process]:
    """Wait up to grace_s for processes to exit, then SIGTERM, then SIGKILL; returns those that survived all."""
    alive = [p for p in processes if p.is_running()]
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        for p in alive if sig else []:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        _, alive = psutil.wait_procs(alive, timeout=grace_s if sig is None else 5)
        if not alive:
            break
    return alive


def start_reaper() -> subprocess.Popen:
    """A reaper for this process: if this process dies (its end of the reaper's stdin closes without DISMISS),
    the reaper stops every descendant of it that it has seen and that is still running."""
    # Its own session: a Ctrl-C or killpg of ours spares it. No stdout/stderr: it must not hold a pipe that
    # whoever reads our output waits on.
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid())], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _reap(parent_pid: int) -> None:
    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:  # gone before we started: what it left is beyond our sight
        return
    me = psutil.Process()
    seen: dict[int, psutil.Process] = {}
    while True:
        # Oneself is the parent's child too; a Process object remembers its start time, so a reused pid is
        # never mistaken for one of ours.
        seen.update({p.pid: p for p in descendants([parent]) if p.pid not in (parent_pid, me.pid)})
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        message = os.read(sys.stdin.fileno(), 4096) if ready else None
        if message and DISMISS in message:
            return
        if message == b"":  # EOF without being dismissed: the parent died
            break
    stop(descendants(seen.values()), grace_s=1.0)


if __name__ == "__main__":
    _reap(int(sys.argv[1]))
