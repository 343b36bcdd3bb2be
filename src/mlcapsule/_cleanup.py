"""Clean up what a killed session left behind in a state folder (issue 11, item 18).

Every session of the host makes a ``run-*`` folder in the capsule's state folder for its enclave
worker (the worker's log, its working directory). A clean close deletes it; a SIGKILL or a power
cut leaves it behind. :func:`clean_stale_run_dirs` deletes such leftovers at the next start.

A run folder of a session that is still running must never be deleted. A live session holds an
exclusive ``flock`` on ``run-*/.lock`` (:func:`hold_run_dir`) for as long as it lives; the kernel
drops the lock when the process dies, however it dies, so a folder whose lock can be taken is
stale. A folder without a lock file (made by an older mlcapsule, or one being created right
now) is taken as stale only when no process has a file open inside it and it was not modified in
the last minute.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

LOCK_NAME = ".lock"
#: A lock-less run folder younger than this may be one a session is creating right now.
_YOUNG_SECONDS = 60.0


def hold_run_dir(run_dir: str | os.PathLike[str]) -> int:
    """Mark ``run_dir`` as alive: take an exclusive flock on its lock file and return the
    descriptor. Keep it open as long as the session lives; closing it (or dying) releases it."""
    fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def release_run_dir(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _open_elsewhere(folder: Path) -> bool:
    """True if any process we can see has a file (or its cwd) inside ``folder``."""
    prefix = str(folder.resolve()) + os.sep
    me = os.getpid()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return True  # cannot tell: keep the folder
    for pid in pids:
        if int(pid) == me:
            continue
        base = f"/proc/{pid}"
        links = []
        try:
            links.append(os.readlink(f"{base}/cwd"))
        except OSError:
            pass
        try:
            for fd in os.listdir(f"{base}/fd"):
                try:
                    links.append(os.readlink(f"{base}/fd/{fd}"))
                except OSError:
                    pass
        except OSError:
            continue
        if any((link + os.sep).startswith(prefix) for link in links):
            return True
    return False


def _stale(run_dir: Path) -> tuple[bool, int | None]:
    """(stale?, a descriptor holding its lock while it is deleted)."""
    lock = run_dir / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        try:
            young = time.time() - run_dir.stat().st_mtime < _YOUNG_SECONDS
        except OSError:
            return False, None
        return (not young and not _open_elsewhere(run_dir)), None
    except OSError:
        return False, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: a live session
        os.close(fd)
        return False, None
    return True, fd


def clean_stale_run_dirs(state_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the ``run-*`` folders in ``state_dir`` that no live session holds; return them.

    Never raises: a folder that cannot be checked or deleted is left for the next start.
    """
    removed: list[Path] = []
    try:
        candidates = sorted(Path(state_dir).glob("run-*"))
    except OSError:
        return removed
    for run_dir in candidates:
        try:
            if run_dir.is_symlink() or not run_dir.is_dir():
                continue
            stale, fd = _stale(run_dir)
        except OSError:
            continue
        if not stale:
            continue
        try:
            shutil.rmtree(run_dir, ignore_errors=True)
            if not run_dir.exists():
                removed.append(run_dir)
        finally:
            release_run_dir(fd)
    return removed


def remove_if_empty(folder: str | os.PathLike[str]) -> bool:
    """Remove ``folder`` if it holds nothing (a state folder a dev-key run made and left empty)."""
    try:
        os.rmdir(folder)
        return True
    except OSError:
        return False


def clean_empty_state_dirs(state_root: str | os.PathLike[str]) -> list[Path]:
    """Remove empty state folders under ``state_root`` ($MLCAPSULE_HOME/state) that were not
    modified in the last minute (older `run --unsafe-dev-key` sessions left them)."""
    removed: list[Path] = []
    try:
        folders = [p for p in Path(state_root).iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return removed
    now = time.time()
    for folder in folders:
        try:
            if now - folder.stat().st_mtime < _YOUNG_SECONDS or any(folder.iterdir()):
                continue
        except OSError:
            continue
        if remove_if_empty(folder):
            removed.append(folder)
    return removed
