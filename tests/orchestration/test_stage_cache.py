"""The aligned model's cache (orchestration/stage_cache.py) in whole runs: reused across what does
not determine alignment, never left half-written, shared by the points of a multirun."""

import json
import logging

import pytest

import orchestration.stages as run_module
from helpers.configs import run_tiny

pytestmark = pytest.mark.e2e


def cache_entries(tmp_path, stage="align"):
    folder = tmp_path / "cache" / stage
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_aligned_model_is_reused_across_ratio_defense_stage_and_seed(tiny_cfg, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="run")
    first = run_module.run(tiny_cfg("harmful_ratio=0.1"), tmp_path / "a")
    assert not first["aligned_reused"] and len(cache_entries(tmp_path)) == 1
    caplog.clear()
    second = run_module.run(
        tiny_cfg("harmful_ratio=0.5", "finetune.seed=3", "finetune.sample_seed=4"), tmp_path / "b"
    )
    assert second["aligned_reused"] and "align" in second["reused"]
    entry = tmp_path / "cache" / "align" / cache_entries(tmp_path)[0]
    assert {"adapter.safetensors", "module_state.pt", "meta.json"} <= {
        p.name for p in entry.iterdir()
    }
    assert f"aligned model reused from {tmp_path / 'cache' / 'align'}" in caplog.text
    assert second["aligned_adapter"] == first["aligned_adapter"]
    assert second["aligned_harmful_score"] == first["aligned_harmful_score"]
    # anything that determines alignment gives a new entry
    third = run_module.run(tiny_cfg("align.optimizer.lr=2e-2"), tmp_path / "c")
    assert not third["aligned_reused"] and len(cache_entries(tmp_path)) == 2


def test_killed_cache_write_leaves_no_entry(tiny_cfg, tmp_path, monkeypatch):
    def dying_save(model, path):
        path.write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(run_module, "save_adapter", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_module.run(tiny_cfg(), tmp_path / "a")
    # no entry, no temp dir left behind: only the checkpoints a rerun resumes from
    assert [p for p in cache_entries(tmp_path) if not p.endswith(".checkpoints")] == []
    monkeypatch.undo()
    # a directory without meta.json (e.g. from a hard kill) is never loaded
    results = run_module.run(tiny_cfg(), tmp_path / "b")
    assert not results["aligned_reused"]
    entry = tmp_path / "cache" / "align" / cache_entries(tmp_path)[0]
    (entry / "meta.json").unlink()
    assert not run_module.run(tiny_cfg(), tmp_path / "c")["aligned_reused"]
    assert (entry / "meta.json").is_file()  # the incomplete entry was replaced by a whole one


def test_multirun_sweep_aligns_once(tmp_path):
    """`-m` over harmful_ratio with the basic launcher: one alignment, one results.json per point."""
    done = run_tiny(tmp_path, "-m", "harmful_ratio=0,0.5", f"hydra.sweep.dir={tmp_path}/sweep")
    assert done.returncode == 0, done.stderr[-2000:]
    results = sorted(
        json.loads(p.read_text())["harmful_ratio"]
        for p in (tmp_path / "sweep").glob("*/results.json")
    )
    assert results == [0, 0.5]
    assert len(cache_entries(tmp_path)) == 1
    assert "aligned model reused from" in done.stdout + done.stderr
