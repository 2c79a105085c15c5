"""Small pure-Python helpers shared by every part of the package: did-you-mean hints and atomic writes.

Atomic write: the data goes to a temporary file in the destination's folder, is flushed and
``fsync``-ed, then ``os.replace``-d over the destination. A reader (or a resumed run) therefore sees
either the old complete file or the new complete one, never a half-written file; on any error the
temporary file is removed and the destination is untouched.

This module imports only the standard library, so ``layers``, ``metrics``, ``datamodules`` and
``models`` may all use it without import cycles.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "UsageError",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "did_you_mean",
    "write_json",
]


class UsageError(Exception):
    """Base of the project's own errors: bad config, data, checkpoint or bundle; the message names the fix.

    ``interpzoo-train`` / ``interpzoo-eval`` (:mod:`interpzoo.cli`) print such an error as one paragraph,
    without a traceback (unless ``HYDRA_FULL_ERROR=1`` or ``INTERPZOO_VERBOSE=1``), and exit with
    :attr:`exit_code`: 2 for a usage error (fix the command, config or input file), 1 for a run that failed
    on its own (e.g. a non-finite loss).
    """

    exit_code: int = 2


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """``"; did you mean 'x'?"`` for the closest choices (``difflib``, cutoff 0.6), or an empty string.

    Meant to be appended to an error message: ``f"unknown model {name!r}{did_you_mean(name, names)}"``.
    """
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """Create a new empty file ``.<name>.<random>.tmp`` in ``folder``; returns ``(fd, path)``.

    ``os.open(..., 0o666)`` lets the kernel apply the umask, so the file gets the permissions a plain
    ``open(path, "w")`` would give (``tempfile.mkstemp`` would make it private, ``0o600``), without
    changing the process umask (which other threads could observe).
    """
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(
        f"could not create a temporary file next to {folder / name}; clean up {folder}/.*.tmp"
    )


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on success fsync it and ``os.replace`` ``path``.

    >>> with atomic_open("out/model.ckpt") as f:
    ...     torch.save(obj, f)

    The parent folder is created. ``mode`` must be a write mode (``"wb"`` or ``"w"``); ``kwargs`` go to
    :func:`open` (e.g. ``encoding``). The new file gets the permissions a plain ``open`` would give
    (``0o666`` minus the umask).
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_open writes a whole new file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); returns ``path``."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see the module docstring); returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write plain JSON data atomically, indented by 2, keys sorted, with a final newline; returns ``path``.

    ``data`` must already be JSON-able (convert tensors first, e.g. with ``interpzoo.io.to_plain``).
    """
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
