"""Reading JSONL input files with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from esr.errors import EsrError


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise EsrError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EsrError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise EsrError(f"{path}:{n}: each line must be a JSON object")
            rows.append(row)
    return rows
