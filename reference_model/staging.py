"""Atomic outputs, one rule for folders and files: everything is written under a hidden temporary name beside
the target and renamed over it only when complete (and no signal is pending), with the user's umask; on any
failure the temporary output is removed, and a full disk is reported naming the target, never the temp name.
`staging_folder` (checkpoints, artifacts, engine folders) and `write_atomically` (reports, plots, caches)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .errors import FusionError
from .interruption import raise_if_signalled


def current_umask() -> int:
    """The process's umask (read by setting it and restoring it): outputs get the modes any other file would."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(folder: Path) -> None:
    umask = current_umask()
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # no EDQUOT on Windows


class OutputExistsError(FusionError, FileExistsError):
    """The output folder exists: before the command started, or created by another process while it ran."""


class DiskFullError(FusionError):
    """The disk (or the user's quota) filled up while an output was written; the partial output is removed."""


def disk_full_cause(error: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT OSError behind `error` (itself, or along its cause/context chain: libraries wrap it),
    or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return error
        error = error.__cause__ or error.__context__
    return None


def disk_full_error(final: Path, cause: OSError, written: int) -> DiskFullError:
    """The error naming the output the user asked for (never the hidden temp name) and the space left, measured
    after the partial output was removed."""
    folder = next((p for p in [final, *final.parents] if p.exists()), Path("/"))
    try:
        free = f"{_amount(shutil.disk_usage(folder).free)} free there now"
    except OSError:
        free = "free space unknown"
    reason = "the disk is full" if cause.errno == errno.ENOSPC else "the disk quota is exceeded"
    return DiskFullError(
        f"{final}: {reason} ({cause.strerror}); the partial output ({_amount(written)} written) was removed and "
        f"{free}; free some space or choose another location"
    )


def _amount(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _size(folder: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


@contextmanager
def staging_folder(out_dir: str | Path):
    """Yield a hidden temp folder beside `out_dir` that is renamed to it on success and removed on failure.
    Another process creating `out_dir` meanwhile, or a full disk, ends in a FusionError naming `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        raise OutputExistsError(f"{out_dir}: already exists; nothing was written (choose a new folder or remove it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".partial"))
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full_error(out_dir, e, 0) from None
        raise
    try:
        yield tmp
        raise_if_signalled()  # a Ctrl-C a library swallowed: never publish what it interrupted
        _apply_umask(tmp)  # mkdtemp creates 0700; the result should look like any other folder
        raced = OutputExistsError(
            f"{out_dir}: another process created it while this command ran; this command's result was discarded "
            "(choose a new folder, or remove it and run again)"
        )
        if out_dir.exists() or out_dir.is_symlink():  # rename(2) would replace an empty folder silently
            raise raced
        try:
            tmp.rename(out_dir)
        except OSError:
            if out_dir.exists() or out_dir.is_symlink():  # created between the check and the rename
                raise raced from None
            raise
    except BaseException as e:
        full = disk_full_cause(e) if isinstance(e, Exception) and not isinstance(e, FusionError) else None
        written = _size(tmp) if full is not None else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise disk_full_error(out_dir, full, written) from None
        raise


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(temp_path) for a hidden temp file beside `path`, then rename it over `path`; the temp file is
    removed if anything fails (Ctrl-C and SIGTERM included). Missing parent folders are created. A full disk
    (ENOSPC, EDQUOT, however the writer wrapped it) is a DiskFullError naming `path`, never the temp name."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        os.close(fd)
        write(Path(tmp))  # (writers may recreate the file, so its mode is set afterwards)
        raise_if_signalled()  # a Ctrl-C a library swallowed: never publish what it interrupted
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; outputs look like any other file
        os.replace(tmp, path)
    except BaseException as e:
        written = 0
        if tmp is not None:
            written = os.stat(tmp).st_size if os.path.exists(tmp) else 0
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, FusionError):  # an interruption stays one
            full = disk_full_cause(e)
            if full is not None:
                raise disk_full_error(path, full, written) from None
        raise
    return path
