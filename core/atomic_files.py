"""Files written whole or not at all, never replacing one, and the temporary files a killed process left behind.

Data goes to a hidden temporary file in the target folder, named after the writing process
(``.dev2pro-<pid>-<random>.tmp``), and is then hard-linked to its final name: a link fails if the name exists. A
process killed mid-write (SIGKILL, power loss) leaves its temporary file; the next write to that folder removes
the ones whose process is gone, and any older than a day (a state file is up to ~0.5 GB).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from typing import Callable

TEMP_PREFIX = ".dev2pro-"
TEMP = re.compile(r"^\.dev2pro-(?:(\d+)-)?.*\.tmp$")  # older versions wrote no pid
STALE_SECONDS = 24 * 3600


class WriteFailed(OSError):
    """Writing new files failed and none of them was left behind; ``cause`` says why in words."""

    def __init__(self, paths: list[str], cause: str, code: int | None):
        super().__init__(code, cause)
        self.paths, self.cause, self.code = paths, cause, code


def error_code(e: BaseException) -> int | None:
    """The errno of an OSError, or of an I/O error safetensors reports as text ('... (os error 28)')."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    match = re.search(r"os error (\d+)", str(e))
    return int(match.group(1)) if match else None


def is_file_system_error(e: BaseException) -> bool:
    return isinstance(e, OSError) or error_code(e) is not None


def tensor_bytes(*tensor_dicts: dict) -> int:
    """The bytes the tensors of ``tensor_dicts`` take on disk (headers aside), for a full disk's message."""
    return sum(t.numel() * t.element_size() for d in tensor_dicts for t in d.values() if hasattr(t, "element_size"))


def cause_in_words(e: BaseException, folder: str, needed: int) -> str:
    code = error_code(e)
    if code == errno.EROFS:
        return f"{folder} is on a read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return f"ComfyUI may not write to {folder} (permission denied)"
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = 0
        return f"the disk is full: about {needed:,} bytes are needed, {free:,} are free"
    return os.strerror(code) if code else f"{type(e).__name__}: {e}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's live process, or a pid we cannot ask about: keep its file
    return True


def remove_stale_temps(folder: str, now: float | None = None) -> list[str]:
    """Delete our temporary files in ``folder`` whose writer is dead or that are older than a day; returns them."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = TEMP.match(name)
        if not match:
            continue
        path = os.path.join(folder, name)
        pid = int(match.group(1)) if match.group(1) else None
        try:
            old = now - os.path.getmtime(path) > STALE_SECONDS
            if old or (pid is not None and pid != os.getpid() and not _alive(pid)):
                os.unlink(path)
                removed.append(path)
        except OSError:
            continue  # gone meanwhile, or not ours to delete
    return removed


def temp_file(folder: str) -> str:
    """A new empty temporary file in ``folder`` (created), after clearing the stale ones there."""
    os.makedirs(folder, exist_ok=True)
    remove_stale_temps(folder)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def _link_new(tmp: str, path: str) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        # Filesystems without hard links: reserve the name exclusively, then move the data over it.
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(tmp, path)


def write_new_files(files: list[tuple[str, Callable[[str], None]]], needed: int = 0) -> None:
    """Write each ``(path, write)`` (``write(tmp)`` fills a temporary file) so that either every path appears or
    none does; never replaces an existing file (FileExistsError, with nothing left behind). Any other failure
    raises WriteFailed, its cause in words (``needed``: the bytes the files take, for a full disk)."""
    try:
        _write_new_files(files)
    except FileExistsError:
        raise
    except Exception as e:  # OSError, or safetensors' own error type wrapping one
        if not is_file_system_error(e):
            raise
        folder = os.path.dirname(os.path.abspath(files[0][0]))
        raise WriteFailed([p for p, _ in files], cause_in_words(e, folder, needed), error_code(e)) from e


def _write_new_files(files: list[tuple[str, Callable[[str], None]]]) -> None:
    temps, linked = [], []
    try:
        for path, write in files:
            tmp = temp_file(os.path.dirname(os.path.abspath(path)))
            temps.append(tmp)
            write(tmp)
        for (path, _), tmp in zip(files, temps):
            _link_new(tmp, path)
            linked.append(path)
    except BaseException:
        for path in linked:  # ours: both or neither
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
