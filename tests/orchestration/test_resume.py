"""A run killed with SIGKILL during alignment, then again during fine-tuning, and then run again
with the same command, ends with exactly the results, adapter files and ε of a run never
killed: each training stage resumes from its newest checkpoint in the stage cache, and what
finished is not redone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers.configs import ROOT, TINY

# Two epochs of 3 steps per stage on the tiny config; a checkpoint after every step.
OVERRIDES = ["align.epochs=2", "finetune.epochs=2", "checkpointing.every_n_steps=1"]
RUN_SPECIFIC = {  # where and how long, not what was computed
    "seconds",
    "run_dir",
    "reused",
    "resumed",
    "aligned_adapter",
    "aligned_reused",
    "finetuned_adapter_cached",
}


def command(tmp_path, run_dir, defense: str) -> list[str]:
    return [
        f"defense={defense}",
        *TINY,
        *OVERRIDES,
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
    ]


def run(args: list[str], killed_at: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    script = (
        ["run.py"]
        if killed_at is None
        else ["tests/helpers/killed_run.py", killed_at[0], str(killed_at[1])]
    )
    return subprocess.run(
        [sys.executable, *script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def outputs(run_dir) -> tuple[dict, dict]:
    results = json.loads((run_dir / "results.json").read_text())
    adapters = {
        p.name: load_file(str(p)) for p in sorted((run_dir / "adapters").glob("*.safetensors"))
    }
    return {k: v for k, v in results.items() if k not in RUN_SPECIFIC}, adapters


@pytest.mark.e2e
@pytest.mark.parametrize("defense", ["sft", "panacea", "antibody"])
def test_a_run_killed_twice_resumes_to_the_uninterrupted_outputs(tmp_path, defense):
    reference = tmp_path / "reference"
    done = run(command(tmp_path / "ref", reference, defense))
    assert done.returncode == 0, done.stderr[-3000:]

    resumed = tmp_path / "resumed"
    args = command(tmp_path, resumed, defense)
    killed = run(args, killed_at=("align", 2))
    assert killed.returncode == -9, killed.stderr[-3000:]
    cache = tmp_path / "cache"
    assert not [p for p in (cache / "align").iterdir() if not p.name.startswith(".")]  # unfinished
    assert sorted(p.name for p in (cache / "align").glob(".*.checkpoints/step-*.ckpt")) == [
        "step-00000001.ckpt",
        "step-00000002.ckpt",  # the newest 2 are kept
    ]

    killed = run(args, killed_at=("finetune", 4))
    assert killed.returncode == -9, killed.stderr[-3000:]
    log = killed.stdout + killed.stderr
    assert "align resumes from" in log and "step-00000002.ckpt" in log
    assert (
        len(list((cache / "align").glob("*/meta.json"))) == 1
    )  # finished, and its checkpoints gone
    assert not list((cache / "align").glob(".*.checkpoints"))
    assert sorted(p.name for p in (cache / "finetune").glob(".*.checkpoints/step-*.ckpt")) == [
        "step-00000003.ckpt",  # the first epoch's last step
        "step-00000004.ckpt",
    ]

    finished = run(args)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((resumed / "results.json").read_text())
    assert results["resumed"] == {"finetune": "step-00000004.ckpt"}
    assert "aligned" in " ".join(results["reused"]) and "finetune" not in results["reused"]

    expected_results, expected_adapters = outputs(reference)
    got_results, got_adapters = outputs(resumed)
    assert got_results == expected_results
    assert (
        got_adapters.keys()
        == expected_adapters.keys()
        == {
            "deployed.safetensors",
            "finetuned.safetensors",
        }
    )
    for file, tensors in expected_adapters.items():
        for name, tensor in tensors.items():
            assert torch.equal(got_adapters[file][name], tensor), f"{file}: {name}"
    if defense == "panacea":  # ε travels with the fine-tuning stage's cache entry
        (ref_entry,) = (tmp_path / "ref" / "cache" / "finetune").glob("*/module_state.pt")
        (entry,) = (cache / "finetune").glob("*/module_state.pt")
        expected_eps = torch.load(ref_entry, weights_only=False)["panacea_epsilon"]
        eps = torch.load(entry, weights_only=False)["panacea_epsilon"]
        assert eps.keys() == expected_eps.keys() and expected_eps
        assert all(torch.equal(eps[k], expected_eps[k]) for k in eps)


@pytest.mark.e2e
def test_a_preempted_submitit_job_checkpoints_requeues_and_resumes(tmp_path):
    """A grid point run by hydra/launcher=submitit_local gets SLURM's preemption signal (USR2)
    during fine-tuning: it saves a checkpoint at the end of the step under way, submitit requeues
    the job, and the requeued job resumes there and finishes with the uninterrupted outputs."""
    import os
    import signal
    import time

    long_finetune = ["finetune.n=200", "task.n_train=400", "checkpointing.every_n_steps=null"]

    def grid(name: str) -> subprocess.Popen:
        """One point as a submitit job (its threads are submitit's: the reference runs so too)."""
        args = [
            "-m",
            "defense=sft",
            *TINY,
            *OVERRIDES,
            *long_finetune,
            "hydra/launcher=submitit_local",
            f"cache_dir={tmp_path / name / 'cache'}",
            f"hydra.sweep.dir={tmp_path / name / 'sweep'}",
        ]
        return subprocess.Popen(
            [sys.executable, "run.py", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    reference = grid("reference")
    output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, output[-3000:]

    preempted = grid("preempted")
    sweep = tmp_path / "preempted" / "sweep"
    checkpoints = tmp_path / "preempted" / "cache" / "finetune"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob(".*.checkpoints")) and time.monotonic() < deadline:
        time.sleep(0.02)  # the fine-tuning stage is under way once its checkpoint folder exists
    job = subprocess.run(
        ["pgrep", "-f", f"submitit.core._submit.*{sweep}"], capture_output=True, text=True
    )
    pids = [int(p) for p in job.stdout.split()]
    assert pids, "the submitit job was not found"
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    output, _ = preempted.communicate(timeout=600)
    assert preempted.returncode == 0, output[-3000:]

    (point,) = [p for p in sweep.iterdir() if (p / "results.json").is_file()]
    (reference_point,) = [
        p
        for p in (tmp_path / "reference" / "sweep").iterdir()
        if p.is_dir() and not p.name.startswith(".")
    ]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "SIGUSR2: saved step-" in logs and "Requeued job" in logs
    results = json.loads((point / "results.json").read_text())
    assert list(results["resumed"]) == ["finetune"]
    expected_results, expected_adapters = outputs(reference_point)
    got_results, got_adapters = outputs(point)
    assert got_results == expected_results
    for file, tensors in expected_adapters.items():
        assert all(torch.equal(got_adapters[file][k], v) for k, v in tensors.items()), file
