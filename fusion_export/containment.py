"""The containment rule for folders this tool writes and others pass around (artifacts, engine folders) and for
calibration folders.

A manifest's sha256 digests catch accidents (a truncated copy, a file edited by mistake), not a sender: anyone can
edit a manifest and reseal it. So what a manifest *names* is checked on its own, by one rule:
- every path taken from a manifest is a relative POSIX path (no absolute path, no drive, no `..`, no backslash)
  that resolves, links followed, to a regular file inside the folder;
- the folder holds nothing its manifest does not list: every file (and every link) is listed, or refused by name;
  a link that leaves the folder is refused even if listed;
- copies out of such a folder copy the listed files' bytes, never a link, and every destination path is checked
  to stay inside the command's staging folder before anything is written.
Checkpoint folders are the user's own and are read as transformers reads them (a Hugging Face cache snapshot's
files are links into the cache's `blobs/`); what is copied out of one is copied as data (`copy_data`).
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from reference_model.errors import FusionError
from reference_model.input_files import relative_name, require_regular_file


class ContainmentError(FusionError):
    """A path from a manifest or a folder's content that leaves the folder, is not listed, or is not a file."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _resolved(path: Path, where: str) -> Path:
    """`path` with every link resolved; a link loop is refused by name (Path.resolve raises RuntimeError)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:
        raise ContainmentError(f"{where}: {path} cannot be resolved ({e}); refusing it") from None


def check_relative_name(name: object, where: str) -> PurePosixPath:
    """A name a manifest gives for a file of its folder: relative, POSIX, without `..` (checked as text, before
    the file system is asked anything)."""
    return relative_name(name, where, ContainmentError)


def contained_path(folder: Path, name: object, where: str) -> Path:
    """`folder / name` for a name a manifest gives, refused unless it stays inside `folder` with every link
    resolved and is a regular file there."""
    pure = check_relative_name(name, where)
    root = _resolved(folder, where)
    path = folder / pure
    if not _inside(_resolved(path, where), root):
        raise ContainmentError(f"{where}: {name!r} is a link that leaves {folder}; refusing it")
    if path.is_symlink() or path.exists():
        require_regular_file(path, where)  # a FIFO or device would block or stream forever
    return path


def check_folder_contents(folder: Path, listed: Iterable[str], manifest_name: str, where: str) -> None:
    """Every entry of `folder` is the manifest or a file it lists; nothing is a link leaving the folder. Folders
    are walked without following links, so a linked folder is an (unlisted) entry itself, never a way out."""
    root = _resolved(folder, where)
    names = set(listed) | {manifest_name}
    unlisted: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        folders = set(dirnames)
        for entry in sorted(dirnames + filenames):
            path = Path(dirpath) / entry
            rel = path.relative_to(folder).as_posix()
            is_link = path.is_symlink()
            if is_link and not _inside(_resolved(path, where), root):
                raise ContainmentError(f"{where}: {rel} is a link to {os.readlink(path)}, outside the folder")
            if entry in folders and not is_link:
                continue  # a real folder: its files are checked as the walk reaches them
            mode = os.lstat(path).st_mode
            if not is_link and not stat.S_ISREG(mode):
                raise ContainmentError(f"{where}: {rel} is not a regular file (a device, FIFO or socket)")
            if rel not in names:
                unlisted.append(rel)
    if unlisted:
        shown = ", ".join(unlisted[:8]) + (f" and {len(unlisted) - 8} more" if len(unlisted) > 8 else "")
        raise ContainmentError(
            f"{where}: {shown} not listed in {manifest_name}; the folder may hold only the files its manifest lists "
            "(remove the extra files, or re-create the folder with fusion-export)"
        )


def staged_path(staging: Path, name: object, where: str) -> Path:
    """Where a file named `name` (often taken from an input's manifest) goes in a command's staging folder:
    refused unless it stays inside, before anything is written."""
    pure = check_relative_name(name, where)
    path = staging / pure
    if not _inside(_resolved(path.parent, where), _resolved(staging, where)) or path.is_symlink():
        raise ContainmentError(f"{where}: {name!r} would be written outside {staging}; refusing it")
    path.parent.mkdir(parents=True, exist_ok=True)  # inside the staging folder, checked above
    return path


def copy_data(source: Path, destination: Path) -> None:
    """The bytes (and mode) of one regular file, links followed at the source and never created: a link in the
    source becomes a file. The source must be a regular file (a FIFO would block the copy)."""
    require_regular_file(source)
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination, follow_symlinks=True)
    shutil.copymode(source, destination)


def copy_listed(folder: Path, names: Iterable[str], staging: Path, where: str) -> list[str]:
    """Copy the listed files of a checked folder into `staging` under the same names, as data; returns the names
    copied. Each source is contained in `folder` and each destination in `staging`."""
    copied = []
    for name in sorted(names):
        copy_data(contained_path(folder, name, where), staged_path(staging, name, where))
        copied.append(name)
    return copied
