"""File helpers every writer in the package and the tuner share.

Outputs are replaced atomically (a temporary file in the same folder, then a rename) so that an
interrupted run never leaves half a checkpoint, schedule or report behind, and JSON inputs fail as
one-line `UserError`s that name the file instead of as tracebacks.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import UserError


def atomic_write_bytes(path: Path, write) -> None:
    """Call `write(f)` on a temporary file in the same folder, then rename: never half a file.

    The file gets the permissions an ordinary `open(path, "w")` would give (mkstemp's are 0600)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`text` as UTF-8, written atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def read_json(path, what: str):
    """A JSON file's content, or a one-line UserError: '<path>: not <what> (<why>)'."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not {what} ({e})") from None
