"""Atomic outputs: write to a temp name beside the target, rename only when complete.

A writer's temporary file is ``.<stem>.<random>.part<suffix>`` in the target's folder. A job killed
with SIGKILL cannot remove its own temporary file, so every new write of the same target first removes
the partials a dead writer left (:func:`remove_orphans`). Snakemake runs at most one job per output
file, so a partial of the same target normally belongs to a dead job; as a second guard each live
writer holds an exclusive POSIX record lock (``fcntl.lockf``) on its temporary file while it writes, and
partials that are still locked by another process are left alone (the lock dies with the process, SIGKILL
included, and is not inherited by forked DataLoader workers). POSIX locks rather than ``flock``: HDF5
flock()s the files it opens, and the two kinds do not interfere on Linux. The guard is best effort:
closing any descriptor of the file in the writer drops its POSIX lock (h5py does so just before the
rename), and on file systems without working locks the one-job-per-target rule alone applies.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; orphans are removed on the one-job-per-target rule alone
    fcntl = None

log = logging.getLogger(__name__)


class DiskFullError(OSError):
    """Writing an output ran out of disk space; the message names the file and the fix."""


def is_disk_full(exc: BaseException) -> bool:
    # h5py reports the C library's errno only in its message text ("errno = 28, ... No space left").
    return isinstance(exc, OSError) and (exc.errno == errno.ENOSPC or "No space left on device" in str(exc)
                                         or "errno = 28" in str(exc))


def _disk_full(target: Path, exc: OSError) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(target.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(errno.ENOSPC, f"{target}: no space left on device while writing it ({free} in "
                         f"{target.parent}); the partial file was removed. Free disk space (or set results_dir "
                         f"on a larger disk) and rerun: finished outputs are kept ({exc})")


def _default_suffix(target: Path) -> str:
    return "".join(target.suffixes) or ".tmp"


def orphan_pattern(target: str | os.PathLike, suffix: str | None = None) -> re.Pattern:
    """Regex matching the names of :func:`atomic_path` temporaries of ``target`` (and only those)."""
    target = Path(target)
    suffix = suffix if suffix is not None else _default_suffix(target)
    # mkstemp's random part has no dots, so another target whose stem starts with this one never matches.
    return re.compile(rf"^\.{re.escape(target.stem)}\.[A-Za-z0-9_]+\.part{re.escape(suffix)}$")


def _locked(path: Path) -> bool:
    """True when another live process holds the write lock on ``path``."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True  # gone already: nothing to do
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return True
    except OSError:
        return False  # no locking on this file system
    finally:
        os.close(fd)  # releases the probe lock
    return False


def remove_orphans(target: str | os.PathLike, suffix: str | None = None) -> list[Path]:
    """Remove temporaries of ``target`` left by killed writers; returns the removed paths."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pat = orphan_pattern(target, suffix)
    removed = []
    for entry in os.scandir(target.parent):
        if not pat.match(entry.name):
            continue
        p = Path(entry.path)
        if _locked(p):
            log.info("%s: partial %s belongs to a running writer; left alone", target, p.name)
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
            log.warning("%s: removed %s left by an interrupted earlier write", target, p.name)
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None, clean: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    On any exception the temporary file is removed, so a failed job never leaves a file that looks
    complete under the final name; running out of disk space raises :class:`DiskFullError` naming
    ``target``. ``clean`` (default): first remove partials of the same target that
    killed writers left behind (module docstring).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else _default_suffix(target)
    if clean:
        remove_orphans(target, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".part" + suffix, dir=target.parent)
    tmp_path = Path(tmp)
    if fcntl is None:
        os.close(fd)  # no lock to hold (and an open file cannot be renamed on Windows)
        fd = None
    else:
        with contextlib.suppress(OSError):
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise _disk_full(target, exc) from exc
        raise
    finally:
        if fd is not None:
            os.close(fd)  # drops the lock


def file_sha256(path: str | os.PathLike | None) -> str | None:
    """sha256 of a file read in 1 MiB chunks; None when ``path`` is None or does not exist."""
    if path is None or not Path(str(path)).exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(obj, target: str | os.PathLike) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    # numpy scalars/arrays sneak into metric dicts; keep JSON plain.
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
