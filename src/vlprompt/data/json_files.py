"""Reading a JSON annotation file with errors that name the file (and the line of a syntax error)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlprompt.errors import DataError


def read_json(path: Path, kind: str = "annotation file") -> Any:
    """The parsed content of ``path``; a missing, unreadable or malformed file is a DataError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DataError(f"{kind} not found: {path}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {kind} {path}: {err}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err
