"""Names from node inputs resolved inside ComfyUI's model folders, never outside them.

ComfyUI does not check a V3 combo value against its list, so an API client can send any string. A name is a
relative path of plain parts; it is looked up in each folder ComfyUI lists for that kind (``folder_paths``), and
symlinks inside a folder are followed as ComfyUI's own loaders follow them. A name that is absolute, has a drive,
``..``, an empty part or a NUL is refused before the file system is touched, so the error cannot tell what exists
outside.
"""
from __future__ import annotations

import os
import re

_DRIVE = re.compile(r"^[A-Za-z]:")


class OutsideFolder(ValueError):
    """The name does not stay inside the folder it is meant for."""


def checked_name(name: str, what: str) -> list[str]:
    """The parts of ``name`` (``/`` or ``\\`` separated, a trailing ``/`` allowed), or OutsideFolder."""
    if not isinstance(name, str) or not name.strip():
        raise OutsideFolder(f"no {what} given")
    text = name.replace("\\", "/")
    parts = text.rstrip("/").split("/")
    if "\0" in text or text.startswith("/") or _DRIVE.match(text) or any(p in ("", ".", "..") for p in parts):
        raise OutsideFolder(f"'{name[:200]}' is not a name inside {what}; pick an entry of the list")
    return parts


def find_in_folders(folders: list[str], name: str, what: str, want_dir: bool = False) -> str | None:
    """The first ``<folder>/<name>`` that is a file (or, with ``want_dir``, a folder); None when there is none."""
    parts = checked_name(name, what)
    for folder in folders:
        path = os.path.join(folder, *parts)
        if os.path.isfile(path) or (want_dir and os.path.isdir(path)):
            return path
    return None
