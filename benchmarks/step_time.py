"""Step time and peak memory of each defense's training step relative to SFT, measured in one run.

    .venv/bin/python benchmarks/step_time.py                      # default model, batch 8 x 128
    .venv/bin/python benchmarks/step_time.py --model tiny --steps 5

Peak memory is the process's peak RSS during training (reset after the model is loaded; glibc
keeps some freed memory, so it is an upper bound on what is live at once).
Every (defense, repetition) runs in its own process (so peak RSS is that defense's own), in
interleaved order (sft, panacea, sft, panacea, ...) so that machine noise hits both alike. The
user batch and the defender's harmful batch are real samples, all cut to the same length.
Ratios are what to read: absolute times drift on a shared machine. Never used as a test.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFENSES = {  # harmful_batch_size None = the user batch size
    "sft": ("lightning_modules.causal_lm", "CausalLMModule", {}),
    "panacea": ("lightning_modules.panacea", "PanaceaModule", {"harmful_batch_size": None}),
    "antibody_align": (
        "lightning_modules.antibody",
        "AntibodyAlignModule",
        {"harmful_batch_size": None},
    ),
    "antibody_weighting": ("lightning_modules.antibody", "WeightedSFTModule", {}),
    "vaccine": ("lightning_modules.vaccine", "VaccineModule", {}),
    "repnoise": ("lightning_modules.repnoise", "RepNoiseModule", {"harmful_batch_size": None}),
    "booster": ("lightning_modules.booster", "BoosterModule", {"harmful_batch_size": None}),
    "t_vaccine": ("lightning_modules.t_vaccine", "TVaccineModule", {}),  # 8 of the model's layers
    "ldifs": ("lightning_modules.ldifs", "LDIFSModule", {}),
}
# Not timed here: Lisa's and SafeInstr's steps are SFT's (SafeInstr adds k samples; in Lisa an
# alignment batch replaces the user batch and the proximal term is O(#LoRA parameters)), and
# Antidote is a one-shot post transform, not a training step.
# passes per step, the physical floor of the ratio (a no_grad forward is about 1/3 of a
# forward-backward), and the step-time target of the issues
FLOOR = {
    "sft": "1",
    "panacea": "3",
    "antibody_align": "4",
    "antibody_weighting": "1 + 1 forward",
    "vaccine": "2",
    "repnoise": "2 + L+1 lens heads",  # two forwards, one backward through both, the logit lens
    "booster": "3",
    "t_vaccine": "2 + 1 probe per 200 steps",
    "ldifs": "1 + 1 forward",
}
TARGET = {"sft": None, "panacea": 3.2, "antibody_align": 4.3, "antibody_weighting": 1.5}
MEMORY_TARGET = {"antibody_align": 1.10}  # peak memory within 10% of SFT's: no copy of the model


def measure(defense: str, args, queue) -> None:
    queue.put((defense, *time_steps(defense, args)))


def time_steps(defense: str, args, **trainer_kwargs) -> tuple[float, float]:
    """(median step time after warm-up, peak RSS in training) of `defense` in this process."""
    import importlib

    import lightning as L
    import torch

    from datamodules.formatting import PromptFormatter
    from datamodules.harmful import build_harmful_splits
    from datamodules.supervised import SupervisedDataModule
    from plumbing.models import add_lora, build_tiny, load_smollm2

    torch.manual_seed(0)
    base, tokenizer = load_smollm2() if args.model == "smollm2" else build_tiny()
    model = add_lora(base, 8, 16, 0.0, ["q_proj", "k_proj", "v_proj"], seed=0)
    formatter = PromptFormatter(tokenizer, "chat", args.seq_len)
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
        n_eval=10,
    )
    # only the samples the timed run uses (the weighting module scores its whole set at start/end)
    users = [
        {"prompt": formatter.prompt(p.prompt), "answer": p.answer, "is_harmful": False}
        for p in splits.user_pairs
    ][: args.batch_size * (args.warmup + args.steps)]
    dm = SupervisedDataModule(
        users, formatter, args.batch_size, seed=0, defender_pairs=splits.defender_pairs
    )
    module_name, class_name, extra = DEFENSES[defense]
    extra = {k: (args.batch_size if v is None else v) for k, v in extra.items()}
    cls = getattr(importlib.import_module(module_name), class_name)
    module = cls(model, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4), **extra)

    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *a):
            self.start = time.perf_counter()

        def on_train_batch_end(self, *a):
            times.append(time.perf_counter() - self.start)

    trainer = L.Trainer(
        max_steps=args.warmup + args.steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timer()],
        **trainer_kwargs,
    )
    reset_peak_rss()  # the peak of training, not of loading the model (GGUF dequantization)
    trainer.fit(module, datamodule=dm)
    return statistics.median(times[args.warmup :]), peak_rss_mib()


def reset_peak_rss() -> None:
    """Give freed heap back to the OS, then reset the kernel's high-water mark of this process
    (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2, help="processes per defense, interleaved")
    parser.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=list(DEFENSES))
    return parser


def step_table(args) -> list[str]:
    """The Markdown table of every defense's step time and peak RSS relative to SFT."""
    ctx = mp.get_context("spawn")
    results: dict[str, list[tuple[float, float]]] = {d: [] for d in args.defenses}
    for _ in range(args.reps):
        for defense in args.defenses:
            queue = ctx.Queue()
            proc = ctx.Process(target=measure, args=(defense, args, queue))
            proc.start()
            name, step, peak = queue.get()
            proc.join()
            results[name].append((step, peak))

    sft_step = statistics.median(s for s, _ in results["sft"])
    sft_peak = statistics.median(p for _, p in results["sft"])
    lines = [
        f"model={args.model} batch={args.batch_size}x{args.seq_len} steps={args.steps} reps={args.reps}",
        "",
        "| defense | step time (s, median) | ratio vs SFT | floor (passes) | target | peak RSS in training (MiB) "
        "| ratio vs SFT | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for defense, rows in results.items():
        step = statistics.median(s for s, _ in rows)
        peak = statistics.median(p for _, p in rows)
        lines.append(
            f"| {defense} | {step:.2f} | {step / sft_step:.2f}x | {FLOOR[defense]} | "
            f"{verdict(step / sft_step, TARGET.get(defense))} | {peak:.0f} | {peak / sft_peak:.2f}x | "
            f"{verdict(peak / sft_peak, MEMORY_TARGET.get(defense))} |"
        )
    return lines


def main() -> None:
    print("\n" + "\n".join(step_table(parser().parse_args())))


def verdict(ratio: float, target: float | None) -> str:
    if target is None:
        return "-"
    return f"<= {target}x: {'met' if ratio <= target else 'MISSED'}"


if __name__ == "__main__":
    main()
