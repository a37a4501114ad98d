"""Output files (results, policies, profiles): checked before the work, written atomically.

A run that fails to write its results after hours of work has lost them, and a file
half-written by a killed process looks valid to the next reader.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from flexgen.errors import FlexGenError


def check_writable(path, what: str = "output file") -> Path:
    """Fail now, in one line, if `path` cannot be written later (creates missing parents)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise FlexGenError(f"cannot write {what} {p}: it is a directory")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise FlexGenError(f"cannot write {what} {p}: {e.strerror}") from None
    return p


def write_atomic(path, text: str, what: str = "output file") -> Path:
    """Write text to a temporary file beside `path`, then rename it over `path`."""
    p = check_writable(path, what)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise FlexGenError(f"cannot write {what} {p}: {e.strerror}") from None
    return p
