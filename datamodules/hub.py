"""Hugging Face hub datasets through `datasets`, or local files in the same schema.

Every loader takes `path`: a local .jsonl / .json / .parquet / .csv file with the hub dataset's
columns (what `datasets` would return for that split). Without `path` the split is read from the
hub and cached under HF_HOME; offline, the error says how to point at a cache or a file.
"""

from __future__ import annotations

from pathlib import Path

from datamodules.sources import DataFileError
from plumbing.errors import InputError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(
    name: str,
    split: str,
    path: str | None = None,
    config: str | None = None,
    columns: tuple[str, ...] = (),
) -> list[dict]:
    """The rows of `name` (hub id) / `config` / `split`, or of the local file `path`; `columns`
    must all be present (the hub schema), else one error naming the missing ones."""
    from datasets import load_dataset

    where = path or f"{name}{'/' + config if config else ''} [{split}]"
    if path:
        file = Path(path)
        if not file.is_file():
            raise DataFileError(
                f"data file {path} does not exist (a local copy of {name} [{split}] in the hub's schema)"
            )
        builder = FILE_BUILDERS.get(file.suffix)
        if builder is None:
            raise DataFileError(
                f"{path}: unknown file type {file.suffix!r}; use one of {sorted(FILE_BUILDERS)}"
            )
        try:
            dataset = load_dataset(builder, data_files=str(file), split="train")
        except Exception as err:
            raise DataFileError(
                f"{path}: not a readable {builder} file of {name} rows: {err}"
            ) from err
    else:
        try:
            dataset = load_dataset(name, config, split=split)
        except Exception as err:
            raise InputError(
                f"could not load {where} from the Hugging Face hub ({type(err).__name__}: {err}). Offline? "
                f"set HF_HOME to a cache that holds it (and HF_DATASETS_OFFLINE=1), or pass a local file in "
                f"the hub's schema with the config key shown in conf/ (e.g. data.train_path=... / task.test_path=...)"
            ) from err
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DataFileError(
            f"{where} lacks the columns {missing} of {name} (has {dataset.column_names})"
        )
    return [dict(row) for row in dataset]
