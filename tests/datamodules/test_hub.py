"""Loading the hub datasets (datamodules/hub.py): a file without the dataset's columns is refused,
and loading from the hub offline says how to fix it."""

import json
import os
import subprocess
import sys

import pytest

from datamodules.sources import DataFileError
from helpers.configs import ROOT
from helpers.hub import beavertails


def test_a_file_without_the_hub_columns_is_refused(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n")
    with pytest.raises(DataFileError, match=r"lacks the columns \['category', 'is_safe'\]"):
        beavertails(train_path=str(bad))
    with pytest.raises(DataFileError, match="does not exist"):
        beavertails(train_path=str(tmp_path / "missing.jsonl"))


@pytest.mark.e2e
def test_hub_loading_offline_says_how_to_fix_it():
    """No network here: the hub loader fails with the fix in the message (HF_HUB_OFFLINE=1 makes it fail fast)."""
    code = (
        "from datamodules.hub import load_rows\n"
        "load_rows('PKU-Alignment/BeaverTails', '30k_test')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert proc.returncode != 0
    assert "set HF_HOME" in proc.stderr and "data.train_path=" in proc.stderr
