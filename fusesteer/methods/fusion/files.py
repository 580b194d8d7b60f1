"""Run folders: safe file names and atomic JSON files."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path


# --------------------------------------------------------------------------------------------
# A dataset: optimize, then evaluate
# --------------------------------------------------------------------------------------------
def safe_id(rid: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]", "_", str(rid))[:80]
    if s != str(rid):
        s += "-" + hashlib.sha256(str(rid).encode()).hexdigest()[:8]
    return s


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
