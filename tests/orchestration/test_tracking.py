"""Experiment tracking: W&B offline (read back from its run file), TensorBoard and CSV."""

import json
import time
from pathlib import Path

import pytest

import orchestration.stages as run_module
from helpers.configs import compose_tracked

pytestmark = pytest.mark.e2e


def wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline W&B run file (a LevelDB-style log of 32 KiB blocks
    after a 7-byte ':W&B' header; chunk header: crc32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
            if kind == 4:
                chunks.append(pending)
    records = []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def items(record_items) -> dict:
    return {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record_items}


def read_offline_run(run_dir: Path, timeout_s: float = 60.0) -> dict:
    """The run's records once its exit record is on disk (wandb's service process writes the
    file asynchronously: `finish()` can return before the last records land)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            run = _read_offline_run(run_dir)
        except Exception:  # a record half-written at the end of the file, or the file not there yet
            if time.monotonic() > deadline:
                raise
            run = {}
        if "exit_code" in run or time.monotonic() > deadline:
            return run
        time.sleep(0.5)


def _read_offline_run(run_dir: Path) -> dict:
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = {"history": {}, "summary": {}, "config": {}, "files": run_file.parent / "files"}
    for r in wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["group"], out["name"] = r.run.run_group, r.run.display_name
            out["config"].update(items(r.run.config.update))
        elif kind == "history":
            for key, value in items(r.history.item).items():
                out["history"].setdefault(key, []).append(value)
        elif kind == "summary":
            out["summary"].update(items(r.summary.update))
        elif kind == "config":
            out["config"].update(items(r.config.update))
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out


def test_wandb_offline_run_holds_config_metrics_generations_and_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    results = run_module.run(
        compose_tracked(
            tmp_path,
            "logger=wandb",
            f"logger.save_dir={run_dir}",
            "sweep_name=grid7",
            "defense=antibody_weighting",
        ),
        run_dir,
    )
    wb = read_offline_run(run_dir)
    assert (
        wb["group"] == "grid7"
        and wb["name"] == "antibody_weighting_p0.1_s0"
        and wb["exit_code"] == 0
    )
    assert wb["config"]["defense"]["name"] == "antibody_weighting"
    assert len(wb["history"]["align-train/loss"]) >= 2 and "finetune-train/loss" in wb["history"]
    assert wb["summary"]["harmful_score"] == results["harmful_score"]
    assert [
        wb["summary"]["harmful_score_ci_low"],
        wb["summary"]["harmful_score_ci_high"],
    ] == results["harmful_score_ci"]
    assert wb["summary"]["finetune_accuracy"] == results["finetune_accuracy"]
    tables = list(wb["files"].glob("media/table/generations/deployed_*.table.json"))
    table = json.loads(tables[0].read_text())
    assert {"prompt", "output", "harmful"} <= set(table["columns"])
    assert len(table["data"]) == results["n_eval_prompts"] + results["n_task_eval"]
    assert list(wb["files"].glob("media/images/figures/antibody_scores_*.png"))


def test_wandb_run_is_closed_as_failed_when_a_stage_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    def broken(exp, results):
        raise RuntimeError("disk full")

    monkeypatch.setitem(run_module.STAGE_FUNCTIONS, "eval", broken)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="disk full"):
        run_module.run(
            compose_tracked(tmp_path, "logger=wandb", f"logger.save_dir={run_dir}"), run_dir
        )
    assert read_offline_run(run_dir)["exit_code"] == 1


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """Killed (here: a stage raises) and run again into the same directory: one W&B run id."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    cfg = compose_tracked(tmp_path, "logger=wandb", f"logger.save_dir={run_dir}")
    with monkeypatch.context() as patch:
        patch.setitem(run_module.STAGE_FUNCTIONS, "eval", lambda exp, results: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            run_module.run(cfg, run_dir)
    run_module.run(cfg, run_dir)
    run_id = (run_dir / "wandb_run_id").read_text()
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {f.name for f in files} == {f"run-{run_id}.wandb"}


@pytest.mark.parametrize(
    "logger,pattern",
    [("tensorboard", "tb/{stage}/events.out.tfevents.*"), ("csv", "logs/{stage}/metrics.csv")],
)
def test_file_loggers_write_one_log_per_stage(tmp_path, logger, pattern):
    run_dir = tmp_path / "run"
    run_module.run(
        compose_tracked(tmp_path, f"logger={logger}", f"logger.save_dir={run_dir}"), run_dir
    )
    for stage in ("align", "finetune"):
        assert list(run_dir.glob(pattern.format(stage=stage))), stage
