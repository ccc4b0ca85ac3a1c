"""Atomic file and directory writes (a killed run never leaves a partial file or folder under
the final name) and JSONL."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name beside `path`. Created by the caller with the default modes, so the
    umask applies as to any file a user writes: tempfile's are private (0600 files, 0700
    folders), which would hide results and the shared stage cache from a team's other users."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_directory(
    final: Path, fill: Callable[[Path], None], complete: Callable[[Path], bool]
) -> Path:
    """`fill(tmp)` fills a temporary sibling of `final`, which is then renamed to `final`: a
    killed writer leaves only a hidden .tmp folder. If a `final` that is `complete` appeared
    meanwhile (a parallel writer finished first), it is kept and this one discarded; an
    incomplete one (its marker file deleted by hand, say) is replaced."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    tmp.mkdir()
    try:
        fill(tmp)
        try:
            tmp.rename(final)
        except OSError:  # a non-empty `final` exists
            if not final.is_dir():
                raise
            if complete(final):
                shutil.rmtree(tmp)
            else:
                stale = final.with_name(f"{tmp.name}.stale")
                final.rename(stale)
                tmp.rename(final)
                shutil.rmtree(stale)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
