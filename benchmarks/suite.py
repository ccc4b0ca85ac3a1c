"""Every speed and memory target of the project, measured side by side in one run on one model,
batch and machine, written as one Markdown report. Run on demand; never a test.

    .venv/bin/python benchmarks/suite.py --out benchmarks/latest.md          # default model
    .venv/bin/python benchmarks/suite.py --model tiny --steps 2 --reps 1     # a quick check of the script

1. Training step: time and peak RSS of every defense's step vs SFT (benchmarks/step_time.py; with
   the allocator returning blocks of 1 MiB or more, so that peak RSS is close to live memory).
2. Evaluation: greedy generation of the evaluation prompts in batches (this framework) vs one
   prompt at a time (how the reference implementations evaluate); the outputs are compared.
3. Sweep: 4 harmful ratios run as 4 `run.py` commands each with its own empty cache (each
   re-aligns) vs sharing one stage cache (the first aligns, the others reuse it), with the base
   model converted at every command and with it cached; and the fixed cost per command of each.
   Sizes keep the papers' proportion: alignment set 5x the user set, same epochs.
4. Fine-tuning cache: random_perturb at 4 intensities, the fine-tuning stage shared vs redone.
5. Parallel points: a 2-point grid one after the other vs joblib n_jobs=2 (cores shared).
6. DDP: SFT samples/s with 2 processes (gloo, half the batch each) vs 1 process, same global batch.
Ratios are what to read: absolute times drift on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import step_time  # noqa: E402

EVAL_TARGET = 5.0  # batched evaluation at least 5x one prompt at a time
SWEEP_TARGET = 2.5  # a 4-ratio sweep with the cache at least 2.5x faster than re-aligning
SWEEP_RATIOS = ["0", "0.05", "0.1", "0.2"]


def evaluation_rows(args) -> list[str]:
    import torch

    from datamodules.formatting import PromptFormatter
    from datamodules.harmful import build_harmful_splits
    from plumbing.generation import generate_greedy
    from plumbing.models import build_tiny, load_smollm2

    model, tokenizer = load_smollm2() if args.model == "smollm2" else build_tiny()
    formatter = PromptFormatter(tokenizer, "chat", 160)
    splits = build_harmful_splits(
        "pkg:pyrit/datasets/jailbreak/many_shot_examples.json",
        [
            {
                "path": "pkg:pyrit/datasets/seed_datasets/local/adv_bench.prompt",
                "format": "seed_yaml",
            }
        ],
        n_defender=100,
        n_align=10,
        n_eval=args.eval_prompts,
    )
    prompts = [formatter.prompt(p) for p in splits.eval_prompts]
    torch.manual_seed(0)
    timings, outputs = {}, {}
    for name, batch_size in (
        ("one prompt at a time", 1),
        (f"batched ({args.eval_batch_size})", args.eval_batch_size),
    ):
        start = time.perf_counter()
        outputs[name] = generate_greedy(
            model, tokenizer, prompts, args.eval_tokens, batch_size, desc=name
        )
        timings[name] = time.perf_counter() - start
    single, batched = timings.values()
    same = sum(a == b for a, b in zip(*outputs.values()))
    return [
        f"{len(prompts)} evaluation prompts, greedy, {args.eval_tokens} new tokens, model={args.model}; "
        f"identical outputs: {same}/{len(prompts)}",
        "",
        "| generation | wall time (s) | prompts/s | speed-up | target |",
        "|---|---|---|---|---|",
        f"| one prompt at a time | {single:.1f} | {len(prompts) / single:.2f} | 1.00x | - |",
        f"| batched ({args.eval_batch_size}) | {batched:.1f} | {len(prompts) / batched:.2f} | "
        f"{single / batched:.2f}x | {verdict(single / batched, EVAL_TARGET)} |",
    ]


def small_run_overrides(args) -> list[str]:
    """The sweep sections' sizes: the papers' proportion (alignment set 5x the user set), 1 epoch
    each, a small evaluation (these sections time what is redone, not the evaluation)."""
    overrides = [
        f"model={args.model}",
        "~logger",
        "task.n_train=400",
        "task.n_test=40",
        f"data.n_align={args.sweep_align}",
        "data.n_retain=0",
        f"finetune.n={args.sweep_align // 5}",
        "align.epochs=1",
        "finetune.epochs=1",
        "data.n_eval=10",
        "data.n_eval_remainder=0",
        "data.heldout_sources=[]",
        "eval.n_task=10",
    ]
    if args.model == "tiny":
        overrides[0:1] = ["model=tiny", "data.retain_max_new_tokens=6"]
    return overrides


def timed_run(args, cache: Path, out: Path, *overrides: str) -> tuple[float, float]:
    """One `run.py` command: (its wall time, its stage seconds without process start and model
    load, i.e. what is left of the wall time once the fixed cost per command is taken out)."""
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "run.py",
            *small_run_overrides(args),
            *overrides,
            f"cache_dir={cache}",
            f"hydra.run.dir={out}",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - start
    if not (out / "results.json").is_file():  # a run without an eval stage writes none
        return wall, float("nan")
    seconds = json.loads((out / "results.json").read_text())["seconds"]
    return wall, sum(v for k, v in seconds.items() if k != "load_model")


def sweep_rows(args) -> list[str]:
    """Three ways to run the same 4 commands: each with its own empty cache (re-aligning, and
    converting the GGUF model, every time), one shared stage cache with the base model converted
    at every command (how it ran before the base model was cached), and one shared cache that
    also keeps the converted base model."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ways = {
            "re-aligning at every point": [
                timed_run(
                    args,
                    tmp / f"own_{r}",
                    tmp / "a" / r,
                    f"harmful_ratio={r}",
                    "cache_base_model=false",
                )
                for r in SWEEP_RATIOS
            ],
            "stage cache, base model converted at every command": [
                timed_run(
                    args,
                    tmp / "shared_b",
                    tmp / "b" / r,
                    f"harmful_ratio={r}",
                    "cache_base_model=false",
                )
                for r in SWEEP_RATIOS
            ],
            "stage cache and cached base model": [
                timed_run(args, tmp / "shared_c", tmp / "c" / r, f"harmful_ratio={r}")
                for r in SWEEP_RATIOS
            ],
        }
    baseline = ways["re-aligning at every point"]
    rows = [
        f"4 runs of run.py (harmful_ratio={','.join(SWEEP_RATIOS)}, defense=sft): alignment set "
        f"{args.sweep_align} prompts, user set {args.sweep_align // 5}, 1 epoch each. Fixed cost "
        "per command = wall time less the stage seconds (process start, imports, model load); "
        "the cached base model is built by the first command of its sweep.",
        "",
        "| 4-ratio sweep | wall time per point (s) | fixed cost per command (s, median) | wall time (s) | speed-up | stage time (s) | speed-up | target (wall) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, points in ways.items():
        wall = sum(w for w, _ in baseline) / sum(w for w, _ in points)
        stages = sum(s for _, s in baseline) / sum(s for _, s in points)
        target = "-" if points is baseline else verdict(wall, SWEEP_TARGET)
        rows.append(
            f"| {name} | {', '.join(f'{w:.0f}' for w, _ in points)} | "
            f"{statistics.median(w - s for w, s in points):.1f} | {sum(w for w, _ in points):.0f} | "
            f"{wall:.2f}x | {sum(s for _, s in points):.0f} | {stages:.2f}x | {target} |"
        )
    return rows


def finetune_cache_rows(args) -> list[str]:
    """random_perturb at 4 noise intensities: with the stage cache shared by the 4 commands (one
    fine-tuning, one evaluation before the noise) vs each command in its own copy of the cache
    holding only the alignment and the base model (it fine-tunes and evaluates again: how such a
    sweep ran before the fine-tuning stage was cached)."""
    import shutil

    intensities = ["0.001", "0.01", "0.05", "0.1"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seed = tmp / "seed_cache"
        timed_run(args, seed, tmp / "seed_run", "defense=sft", "stages=[align]")  # align once
        shared = tmp / "shared"
        shutil.copytree(seed, shared)
        cached = [
            timed_run(
                args, shared, tmp / "c" / i, "defense=random_perturb", f"defense.post.intensity={i}"
            )
            for i in intensities
        ]
        uncached = []
        for i in intensities:
            own = tmp / f"own_{i}"
            shutil.copytree(seed, own)
            uncached.append(
                timed_run(
                    args,
                    own,
                    tmp / "u" / i,
                    "defense=random_perturb",
                    f"defense.post.intensity={i}",
                )
            )
    ratio = sum(w for w, _ in uncached) / sum(w for w, _ in cached)
    stage_ratio = sum(s for _, s in uncached) / sum(s for _, s in cached)
    return [
        f"4 runs of run.py (defense=random_perturb, defense.post.intensity={','.join(intensities)}), "
        f"the aligned model already cached; user set {args.sweep_align // 5}, 1 epoch; "
        "each run evaluates before and after the noise.",
        "",
        "| 4-intensity sweep | wall time per point (s) | wall time (s) | speed-up | stage time (s) | speed-up |",
        "|---|---|---|---|---|---|",
        f"| fine-tuning at every point | {', '.join(f'{w:.0f}' for w, _ in uncached)} | "
        f"{sum(w for w, _ in uncached):.0f} | 1.00x | {sum(s for _, s in uncached):.0f} | 1.00x |",
        f"| fine-tuning cached | {', '.join(f'{w:.0f}' for w, _ in cached)} | "
        f"{sum(w for w, _ in cached):.0f} | {ratio:.2f}x | {sum(s for _, s in cached):.0f} | {stage_ratio:.2f}x |",
    ]


def parallel_rows(args) -> list[str]:
    """A 2-point grid (two seeds, so nothing is shared but the base model) run by Hydra's basic
    launcher (one point after the other) vs joblib with n_jobs=2 (each point gets half the cores)."""
    import os

    cores = len(os.sched_getaffinity(0))
    walls = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, launcher in (
            ("one after the other (basic)", []),
            (
                "in parallel (joblib, n_jobs=2)",
                ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
            ),
        ):
            cache = tmp / f"cache_{len(walls)}"
            timed_run(
                args, cache, tmp / f"warm_{len(walls)}", "stages=[align]", "seed=7"
            )  # base model cached
            start = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "run.py",
                    "-m",
                    *small_run_overrides(args),
                    "seed=0,1",
                    *launcher,
                    f"cache_dir={cache}",
                    f"hydra.sweep.dir={tmp / f'sweep_{len(walls)}'}",
                ],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            walls[name] = time.perf_counter() - start
    sequential = walls["one after the other (basic)"]
    return [
        f"2 points (defense=sft, seed=0,1: each aligns), {cores} cores; the base model cached beforehand.",
        "",
        "| 2-point grid | wall time (s) | speed-up |",
        "|---|---|---|",
        *(f"| {name} | {wall:.0f} | {sequential / wall:.2f}x |" for name, wall in walls.items()),
    ]


def _ddp_worker(rank: int, world: int, port: int, args, out: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
    )
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    per_process = argparse.Namespace(**{**vars(args), "batch_size": args.batch_size // world})
    step, _ = step_time.time_steps(
        "sft", per_process, devices=world, strategy="ddp" if world > 1 else "auto"
    )
    if rank == 0:
        out.write_text(str(step))


def ddp_rows(args) -> list[str]:
    import torch.multiprocessing as mp

    if (os.cpu_count() or 1) < 2:
        return ["DDP: skipped, fewer than 2 CPU cores"]
    steps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            out = Path(tmp) / f"world{world}"
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_ddp_worker, args=(world, port, args, out), nprocs=world)
            steps[world] = float(out.read_text())
    one, two = steps[1], steps[2]
    return [
        f"SFT, global batch {args.batch_size}x{args.seq_len}, model={args.model}, CPU ({os.cpu_count()} cores "
        f"shared by the processes), median step after warm-up",
        "",
        "| processes | step time (s) | samples/s | throughput vs 1 process |",
        "|---|---|---|---|",
        f"| 1 | {one:.2f} | {args.batch_size / one:.2f} | 1.00x |",
        f"| 2 (DDP, gloo) | {two:.2f} | {args.batch_size / two:.2f} | {one / two:.2f}x |",
    ]


def verdict(ratio: float, target: float) -> str:
    return f">= {target}x: {'met' if ratio >= target else 'MISSED'}"


def main() -> None:
    parser = step_time.parser()
    parser.description = __doc__
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["steps", "eval", "sweep", "finetune_cache", "parallel", "ddp"],
        choices=["steps", "eval", "sweep", "finetune_cache", "parallel", "ddp"],
    )
    parser.add_argument("--eval-prompts", type=int, default=40)
    parser.add_argument(
        "--eval-tokens", type=int, default=48, help="the eval default (eval.harmful_max_new_tokens)"
    )
    parser.add_argument(
        "--eval-batch-size", type=int, default=40, help="the eval default (eval.batch_size)"
    )
    parser.add_argument(
        "--sweep-align", type=int, default=100, help="alignment prompts (user set: a fifth)"
    )
    parser.add_argument("--out", type=Path, help="also write the report here (Markdown)")
    args = parser.parse_args()

    os.environ.setdefault(
        "MALLOC_MMAP_THRESHOLD_", "1048576"
    )  # spawned processes: peak RSS ~ live memory
    sections = {
        "steps": ("Training step vs SFT", step_time.step_table),
        "eval": ("Evaluation: batched vs one prompt at a time", evaluation_rows),
        "sweep": ("Sweep: stage cache vs re-aligning at every point", sweep_rows),
        "finetune_cache": (
            "Sweep after fine-tuning: cached fine-tuning stage",
            finetune_cache_rows,
        ),
        "parallel": ("Parallel grid points sharing the cores", parallel_rows),
        "ddp": ("DDP throughput vs one process", ddp_rows),
    }
    report = [f"# Benchmark ({time.strftime('%Y-%m-%d')}, `{' '.join(sys.argv)}`)", ""]
    for name in args.sections:
        title, rows = sections[name]
        started = time.perf_counter()
        report += [
            f"## {title}",
            "",
            *rows(args),
            "",
            f"(section took {time.perf_counter() - started:.0f} s)",
            "",
        ]
        print("\n".join(report[-(len(report) - report.index(f"## {title}")) :]), flush=True)
    if args.out:
        args.out.write_text("\n".join(report))
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
