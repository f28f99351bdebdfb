"""Small helpers shared by the package and its tools."""
import contextlib
import os
import tempfile
from pathlib import Path

import torch


def atomic_write(path, write, binary: bool = False) -> Path:
    """Write a file all at once: ``write(f)`` fills a temporary file in the same
    folder, which then replaces ``path`` in one step. Readers never see a
    half-written file, and a failure leaves the old file (or none) behind.

    Args:
        path: destination; its folder is created if needed.
        write: callable taking the open file object.
        binary: open the temporary file in binary mode.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def format_number(x, digits: int = 1) -> str:
    """``x`` with ``digits`` decimals for a table or summary line; ``"-"`` for a missing value (None)."""
    return "-" if x is None else f"{x:.{digits}f}"


def tensor_version(t: torch.Tensor) -> int:
    """``t``'s in-place modification counter (-1 for inference tensors, which keep none)."""
    return -1 if t.is_inference() else t._version
