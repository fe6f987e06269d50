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


def checked_name(name: str, what: str, hint: str = "pick an entry of the list") -> list[str]:
    """The parts of ``name`` (``/`` or ``\\`` separated, a trailing ``/`` allowed), or OutsideFolder."""
    if not isinstance(name, str) or not name.strip():
        raise OutsideFolder(f"no name given; {hint}")
    text = name.replace("\\", "/")
    parts = text.rstrip("/").split("/")
    if "\0" in text or text.startswith("/") or _DRIVE.match(text) or any(p in ("", ".", "..") for p in parts):
        raise OutsideFolder(f"'{name[:200]}' is not a name inside {what}; {hint}")
    return parts


def find_in_folders(folders: list[str], name: str, what: str, want_dir: bool = False) -> str | None:
    """The first ``<folder>/<name>`` that is a file (or, with ``want_dir``, a folder); None when there is none."""
    parts = checked_name(name, what)
    for folder in folders:
        path = os.path.join(folder, *parts)
        if os.path.isfile(path) or (want_dir and os.path.isdir(path)):
            return path
    return None


NAME_MAX = 255  # bytes of one file name on Linux, macOS and Windows file systems alike
PREFIX_MAX = 1024
NUMBERED_SUFFIX = len("_00001.dev2pro-state")  # the longest ending a save adds to the prefix's last part


def checked_prefix(prefix: str) -> str:
    """A save prefix (``dev2pro/my_subject``) as a relative ``/`` path of plain parts that fit the file system once
    numbered; OutsideFolder (saying what to write instead) otherwise. Checked before any folder is made."""
    text = prefix.strip().replace("\\", "/")
    hint = "use something like 'dev2pro/my_subject'"
    parts = checked_name(text, "models/loras", hint)
    if text.endswith("/"):
        raise OutsideFolder(f"'{text[:200]}' names a folder, not a file; {hint}")
    if len(text.encode()) > PREFIX_MAX:
        raise OutsideFolder(f"the prefix is {len(text.encode())} bytes long; at most {PREFIX_MAX} fit; {hint}")
    for i, part in enumerate(parts):
        room = NAME_MAX - (NUMBERED_SUFFIX if i == len(parts) - 1 else 0)
        if len(part.encode()) > room:
            raise OutsideFolder(f"'{part[:40]}...' is {len(part.encode())} bytes; a file or folder name holds "
                                f"{room} here; {hint}")
    return text
