"""On-disk cache of stage outputs, keyed by the resolved config that determines them.

An entry is a directory `<root>/<stage>/<key>/` holding the stage's files and `meta.json`
(written last). Entries are built in a temporary sibling directory and renamed into place, so a
run killed mid-write leaves no entry that a later run would load; leftovers are temp dirs only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from plumbing.io import build_directory


def config_key(determinants: dict) -> str:
    """A short stable hash of a JSON-able dict (the resolved config that determines a stage)."""
    blob = json.dumps(determinants, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lock(self, stage: str, key: str) -> FileLock:
        """An inter-process lock on one entry: parallel runs (joblib, submitit, SLURM jobs sharing
        the cache) build it once; the others wait, then find it."""
        folder = self.root / ".locks" / stage
        folder.mkdir(parents=True, exist_ok=True)
        return FileLock(folder / f"{key}.lock")

    def checkpoints(self, stage: str, key: str) -> Path:
        """Where the training of entry (stage, key) keeps its checkpoints while it is built: a
        hidden sibling, so an unfinished entry never looks finished; removed once it is stored."""
        return self.root / stage / f".{key}.checkpoints"

    def lookup(self, stage: str, key: str) -> Path | None:
        """The entry's directory if it is complete (has meta.json), else None."""
        path = self.entry(stage, key)
        return path if (path / "meta.json").is_file() else None

    def store(self, stage: str, key: str, write: Callable[[Path], None], meta: dict) -> Path:
        """`write(folder)` fills the entry, then meta.json is added; built in a temporary folder
        and renamed into place (a concurrent run that finished first keeps its entry)."""

        def fill(folder: Path) -> None:
            write(folder)
            text = json.dumps(meta, indent=2, sort_keys=True, default=str)
            (folder / "meta.json").write_text(text)

        return build_directory(
            self.entry(stage, key), fill, complete=lambda f: (f / "meta.json").is_file()
        )
