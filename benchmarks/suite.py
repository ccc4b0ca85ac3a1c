"""Every speed and memory target of the project, measured side by side in one run on one model,
batch and machine, written as one Markdown report. Run on demand; never a test.

    .venv/bin/python benchmarks/suite.py --out benchmarks/latest.md          # default model
    .venv/bin/python benchmarks/suite.py --model tiny --steps 2 --reps 1     # a quick check of the script

1. Training step: time and peak RSS of every defense's step vs SFT (benchmarks/step_time.py; with
   the allocator returning blocks of 1 MiB or more, so that peak RSS is close to live memory).
2. Evaluation: greedy generation of the evaluation prompts in batches (this framework) vs one
   prompt at a time (how the reference implementations evaluate); the outputs are compared.
3. Sweep: 4 harmful ratios run as 4 `run.py` commands sharing one empty stage cache (the first
   aligns, the others reuse it) vs the same 4 commands each with its own empty cache (each
   re-aligns). Sizes keep the papers' proportion: alignment set 5x the user set, same epochs.
4. DDP: SFT samples/s with 2 processes (gloo, half the batch each) vs 1 process, same global batch.
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


def sweep_rows(args) -> list[str]:
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
        "data.n_eval_remainder=0",  # the sweep section times alignment reuse, not evaluation
        "data.heldout_sources=[]",
        "eval.n_task=10",
    ]
    if args.model == "tiny":
        overrides[0:1] = ["model=tiny", "data.retain_max_new_tokens=6"]

    def point(cache: Path, ratio: str, out: Path) -> tuple[float, float]:
        """(wall time of the command, its stage seconds without process start and model load)."""
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "run.py",
                *overrides,
                f"harmful_ratio={ratio}",
                f"cache_dir={cache}",
                f"hydra.run.dir={out / ratio}",
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        wall = time.perf_counter() - start
        seconds = json.loads((out / ratio / "results.json").read_text())["seconds"]
        return wall, sum(v for k, v in seconds.items() if k != "load_model")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cached = [point(tmp / "shared_cache", r, tmp / "cached") for r in SWEEP_RATIOS]
        realigned = [point(tmp / f"cache_{r}", r, tmp / "realigned") for r in SWEEP_RATIOS]
    wall = sum(w for w, _ in realigned) / sum(w for w, _ in cached)
    stages = sum(s for _, s in realigned) / sum(s for _, s in cached)
    fixed = statistics.median(w - s for w, s in cached + realigned)
    return [
        f"4 runs of run.py (harmful_ratio={','.join(SWEEP_RATIOS)}, defense=sft): alignment set "
        f"{args.sweep_align} prompts, user set {args.sweep_align // 5}, 1 epoch each; wall time per point (s): "
        f"cached {', '.join(f'{w:.0f}' for w, _ in cached)}; re-aligned {', '.join(f'{w:.0f}' for w, _ in realigned)}; "
        f"fixed cost per command (process start, imports, model load; median): {fixed:.0f} s",
        "",
        "| 4-ratio sweep | wall time (s) | speed-up | stage time (s) | speed-up | target (wall) |",
        "|---|---|---|---|---|---|",
        f"| re-aligning at every point | {sum(w for w, _ in realigned):.0f} | 1.00x | "
        f"{sum(s for _, s in realigned):.0f} | 1.00x | - |",
        f"| stage cache (align once) | {sum(w for w, _ in cached):.0f} | {wall:.2f}x | "
        f"{sum(s for _, s in cached):.0f} | {stages:.2f}x | {verdict(wall, SWEEP_TARGET)} |",
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
        default=["steps", "eval", "sweep", "ddp"],
        choices=["steps", "eval", "sweep", "ddp"],
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
