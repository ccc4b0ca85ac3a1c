"""SafeInstr (Bianchi et al., "Safety-Tuned LLaMAs", ICLR 2024): safety samples (a harmful prompt
answered with a refusal) added to the user's fine-tuning data (docs/methods.md, "SafeInstr").

mode=mix (the paper's): D' = D_user ∪ S_k, shuffled together, then plain SFT on D' (the
fine-tuning set has n + k samples). mode=joint (the Booster repository's VLGuard trainer): every
step's loss is g(B_user) + λ·f(B_safe), with a separate batch of safety samples.

The k safety samples are a seeded subset of
- source=defender: the defender-held harmful prompts, each paired with one of the project's
  refusals. This role is disjoint from the alignment, user and evaluation prompts by
  construction.
- source=file: the safety-tuned-llamas file `safety_only_data_Instructions.json` (2483
  instruction -> safe answer pairs). Its data licence (CC BY-NC 4.0) forbids shipping it: the
  user downloads it, and its sha256 is checked before use.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

import torch

from datamodules.cycling import CyclingBatches
from datamodules.refusals import refusal_for
from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.checks import (
    batch_size_problems,
    count_problems,
    nonnegative_problems,
    raise_problems,
)
from plumbing.errors import InputError

MODES = ("mix", "joint")
SOURCES = ("defender", "file")
# sha256 of safety_only_data_Instructions.json at vinid/safety-tuned-llamas commit 36a4b8d
SAFETY_TUNED_LLAMAS_SHA256 = "7dde08acf87f10cf74fd1b76f56538eae8e413ae8e6b09e3f7bcd97769058dbe"
SAFETY_FILE_URL = (
    "https://github.com/vinid/safety-tuned-llamas/raw/main/data/training/"
    "safety_only_data_Instructions.json"
)


def read_safety_file(path: str | Path, sha256: str = SAFETY_TUNED_LLAMAS_SHA256) -> list[dict]:
    """The (instruction, input, output) pairs of the safety-tuned-llamas file, checksum verified."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"safeinstr path={path} is not a file: download {SAFETY_FILE_URL} (CC BY-NC 4.0, not "
            "shipped with this project) and pass its location"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise InputError(
            f"safeinstr file {path} has sha256 {digest}, not {sha256} (the file at "
            "safety-tuned-llamas commit 36a4b8d): download it again, or pass sha256= for another version"
        )
    return json.loads(path.read_text())


def safety_pool_size(values: dict, n_defender: int) -> int:
    """How many safety samples the configured source holds."""
    if values.get("source", "defender") == "file":
        return len(
            read_safety_file(values["path"], values.get("sha256", SAFETY_TUNED_LLAMAS_SHA256))
        )
    return n_defender


class SafeInstrModule(CausalLMModule):
    """mode: mix | joint. safety_samples: k. source: defender | file (with path, sha256).
    lam: λ of the joint loss. safety_batch_size: safety samples per joint step and process (the
    Booster repository's 4). sample_seed: which k samples."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Callable,
        scheduler: Callable | None = None,
        mode: str = "mix",
        safety_samples: int = 100,
        source: str = "defender",
        path: str | None = None,
        sha256: str = SAFETY_TUNED_LLAMAS_SHA256,
        lam: float = 1.0,
        safety_batch_size: int = 4,
        sample_seed: int = 0,
        max_grad_norm: float | None = None,
    ):
        raise_problems(
            self.hyperparameter_problems(
                {
                    "mode": mode,
                    "safety_samples": safety_samples,
                    "source": source,
                    "path": path,
                    "lam": lam,
                    "safety_batch_size": safety_batch_size,
                }
            )
        )
        super().__init__(model, optimizer, scheduler, max_grad_norm)
        self.mode, self.k, self.source, self.path, self.sha256 = (
            mode,
            safety_samples,
            source,
            path,
            sha256,
        )
        self.lam, self.safety_batch_size, self.sample_seed = lam, safety_batch_size, sample_seed
        self.safety: CyclingBatches | None = None
        self.added: list[dict] = []  # the safety samples of this run, in their drawn order

    @staticmethod
    def hyperparameter_problems(values: dict) -> list[str]:
        problems = nonnegative_problems(values, ("lam",)) + count_problems(
            values, ("safety_samples",)
        )
        problems += batch_size_problems(values, "safety_batch_size")
        if values.get("mode", "mix") not in MODES:
            problems.append(f"mode={values['mode']!r} must be one of {list(MODES)}")
        if values.get("source", "defender") not in SOURCES:
            problems.append(f"source={values['source']!r} must be one of {list(SOURCES)}")
        elif values.get("source") == "file" and not values.get("path"):
            problems.append(
                f"source=file needs path= (the downloaded safety-tuned-llamas file: {SAFETY_FILE_URL})"
            )
        return problems

    @staticmethod
    def data_problems(values: dict, splits) -> list[str]:
        """Checked against the run's data before the model loads: the source holds k samples."""
        if values.get("source", "defender") == "file":
            try:
                pool = len(
                    read_safety_file(
                        values["path"], values.get("sha256", SAFETY_TUNED_LLAMAS_SHA256)
                    )
                )
            except InputError as err:
                return [str(err)]
        else:
            pool = len(splits.defender_pairs)
        k = values.get("safety_samples", 100)
        if k > pool:
            return [
                f"safety_samples={k} exceeds the {pool} safety samples of "
                f"source={values.get('source', 'defender')}: lower it (or raise data.n_defender)"
            ]
        return []

    def safety_pairs(self, datamodule) -> list[dict]:
        """k (prompt, safe answer) samples, a seeded subset of the source."""
        fmt = datamodule.formatter
        if self.source == "file":
            rows = read_safety_file(self.path, self.sha256)
            pool = [(fmt.prompt(r["instruction"], r.get("input", "")), r["output"]) for r in rows]
        else:
            pool = [
                (fmt.prompt(p.prompt), refusal_for(i))
                for i, p in enumerate(datamodule.defender_pairs)
            ]
        if self.k > len(pool):
            raise InputError(
                f"safeinstr safety_samples={self.k} exceeds the {len(pool)} safety samples of "
                f"source={self.source}: lower it (or raise data.n_defender)"
            )
        chosen = random.Random(self.sample_seed).sample(range(len(pool)), self.k)
        return [{"prompt": pool[i][0], "answer": pool[i][1], "is_harmful": False} for i in chosen]

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if self.added or self.k == 0:  # a second fit of the same module adds nothing twice
            return
        self.added = self.safety_pairs(datamodule)
        if self.mode == "mix":
            datamodule.add_samples(self.added)

    def on_train_start(self) -> None:
        if self.mode != "joint" or self.k == 0:
            return
        dm = self.trainer.datamodule
        self.safety = self.cycled(
            "safety",
            dm.samples_dataloader(
                self.added,
                self.safety_batch_size,
                dm.seed + 3,
                self.trainer.world_size,
                self.trainer.global_rank,
            ),
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.safety is None:
            return loss
        safety_loss = self.batch_loss(self.safety.next(self.device))
        self.log("train/safety_loss", safety_loss.detach(), batch_size=batch["input_ids"].size(0))
        return loss + self.lam * safety_loss
