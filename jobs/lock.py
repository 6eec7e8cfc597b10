"""One run at a time on an output folder: `OutputLock`, an OS lock a crash cannot leave stuck.

The lock is `filelock.FileLock` on ``<output.dir>/.tessera.lock`` (``flock``: the kernel releases it when the
holder's process ends, however it ends, SIGKILL included). Beside it ``.tessera.lock.json`` names the holder (pid,
host, job, since when) for the refusal a second run gets. A holder file found by a run that got the lock was left
by a run that ended without releasing it (a crash): it is reported as stale and taken over.

The lock is only as good as the filesystem's ``flock``: local disks and NFSv4 honour it across processes and hosts;
a filesystem without it is an error here (`filelock`'s soft fallback, which a crash can leave stuck, is off).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from .images import atomic_write
from .spec import TesseraError

log = logging.getLogger("tessera")
LOCK_NAME = ".tessera.lock"


class OutputBusyError(TesseraError):
    """Another run holds the output folder."""


class OutputLock:
    """``with OutputLock(output_dir, job):`` the folder is this process's until the block ends (or it dies)."""

    def __init__(self, output_dir, job: str = ""):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self.holder_path = self.dir / (LOCK_NAME + ".json")
        self.job = job
        self.stale = None  # the holder record a crashed run left, when this run took it over
        self._lock = FileLock(str(self.path), timeout=0, fallback_to_soft=False, thread_local=False)

    def holder(self) -> dict | None:
        try:
            return json.loads(self.holder_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    @staticmethod
    def describe(h: dict | None) -> str:
        if not h:
            return "another process (it has not written its name yet)"
        return (f"pid {h.get('pid')} on {h.get('host')} (job {h.get('job')!r}, since {h.get('since')}; "
                f"command: {h.get('command')})")

    def __enter__(self) -> "OutputLock":
        try:
            self._lock.acquire()
        except Timeout:
            raise OutputBusyError(f"output.dir={str(self.dir)!r} is being rendered by "
                                  f"{self.describe(self.holder())}: wait for it to end, or use another "
                                  "output.dir") from None
        except OSError as e:
            raise OutputBusyError(f"output.dir={str(self.dir)!r}: cannot lock {self.path} ({e.strerror or e}); "
                                  "the filesystem must support flock") from e
        self.stale = self.holder()
        if self.stale:
            log.warning("output.dir=%s: a stale lock of %s was left by a run that ended without releasing it; "
                        "taken over", self.dir, self.describe(self.stale))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "job": self.job,
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)[:500]}
        atomic_write(self.holder_path, lambda f: f.write(json.dumps(record).encode()))
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.holder_path.unlink(missing_ok=True)
        finally:
            self._lock.release()
