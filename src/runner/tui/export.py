"""Export a conversation to a Markdown file in the current folder, safely.

The file is created exclusively: a name already taken, by an earlier export or by a symlink
pointing anywhere, is never written through or over; the next free name is used instead
(`chat-3-paris.md`, `chat-3-paris-2.md`, ...).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from runner.errors import RunnerError

MAX_TRIES = 100


class ExportError(RunnerError):
    """The export could not be written; the message says why, in words."""


def export_folder() -> Path:
    try:
        return Path.cwd()
    except OSError as error:    # the folder runner was started in was deleted (or cannot be read)
        raise ExportError(
            f"the current folder ({os.environ.get('PWD', '?')}) no longer exists: {error.strerror}. "
            "Start runner from another folder to export."
        ) from None


def free_names(file_name: str):
    stem, dot, suffix = file_name.rpartition(".")
    yield file_name
    for n in range(2, MAX_TRIES + 1):
        yield f"{stem}-{n}{dot}{suffix}"


def write_export(markdown: str, file_name: str, folder: Path | None = None) -> Path:
    """Write `markdown` to a new file named after `file_name` in `folder` (the current folder)."""
    folder = folder if folder is not None else export_folder()
    data = markdown.encode("utf-8")
    for name in free_names(file_name):
        path = folder / name
        try:
            # O_EXCL with O_CREAT: fails on any existing name, a symlink included (not followed)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            continue
        except OSError as error:
            raise ExportError(f"could not write {path}: {error.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
        except OSError as error:
            path.unlink(missing_ok=True)
            reason = "the disk is full" if error.errno == errno.ENOSPC else error.strerror
            raise ExportError(f"could not write {path}: {reason}") from None
        return path
    raise ExportError(f"{folder} already holds {MAX_TRIES} exports named like {file_name}")
