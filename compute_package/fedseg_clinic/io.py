"""Atomic file output: write to a temporary sibling, then rename over the target.

Every file fedseg writes (cases, manifests, weights, ledgers, round logs, reports, state
files) goes through these helpers, so an interrupted command leaves either the old file or
the new one, never half of one. ``os.replace`` is atomic within one file system, which the
temporary sibling guarantees.

Permissions: by default a file gets what a plain ``open()`` would give (0666 minus the
umask), because ``mkstemp`` alone makes 0600; pass ``mode=PRIVATE_FILE`` for secrets and
patient data (owner only).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedseg_clinic.errors import FedsegError

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def _umask() -> int:
    """The process umask (reading it requires setting it; restored at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would create a file with."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """The mode a plain ``mkdir`` would create a folder with."""
    return 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_output(path: Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success.

    For writers that want a file name (``np.savez``, tar packers). On an exception the
    temporary file is removed and ``path`` is left as it was.

    Args:
        path: the final file.
        mode: permission bits of the final file (default: what ``open()`` would give).

    Yields:
        The temporary path to write to (it exists, empty).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, default_file_mode() if mode is None else mode)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename).

    Args:
        path: the final file; its folder is created.
        data: the content.
        mode: permission bits (default: what ``open()`` would give).

    Returns:
        ``path``.
    """
    path = Path(path)
    with atomic_output(path, mode) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return path


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: Path, data: Any, mode: int | None = None, **dump_args: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically.

    Args:
        path: the final file.
        data: anything ``json.dumps`` accepts with ``dump_args``.
        mode: permission bits (default: what ``open()`` would give).
        **dump_args: passed to ``json.dumps`` (default ``indent=2``).

    Returns:
        ``path``.
    """
    dump_args.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(data, **dump_args) + "\n", mode)


def read_json_object(path: Path, what: str, missing: str | None = None) -> dict[str, Any]:
    """Read a JSON file that must hold an object; every problem is one line naming it.

    Args:
        path: the file.
        what: what it is, for the messages ("case sidecar", "run info", ...).
        missing: the message when the file does not exist (default: "<path>: missing").

    Raises:
        FedsegError: missing, unreadable, not JSON, or not a JSON object.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FedsegError(missing or f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise FedsegError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(data, dict):
        raise FedsegError(f"{path}: {what} must be a JSON object")
    return data


__all__ = ["PRIVATE_DIR", "PRIVATE_FILE", "atomic_output", "atomic_write_bytes",
           "atomic_write_json", "atomic_write_text", "default_dir_mode",
           "default_file_mode", "read_json_object"]
