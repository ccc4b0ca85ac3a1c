"""What the stages of one run share: config, data, model, stage cache, output paths, and training."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TypeVar

import lightning as L
import torch
from hydra.utils import get_class, get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch.distributed.fsdp import FSDPModule

from callbacks.stage_checkpoints import StageCheckpoints, latest_checkpoint
from datamodules.evaluation import EvaluationDataModule, split_problems
from datamodules.formatting import PromptFormatter
from datamodules.harmful import splits_from_config
from datamodules.poisoned import check_poison_counts
from datamodules.refusals import REFUSALS
from datamodules.retain import retain_instructions
from datamodules.supervised import SupervisedDataModule
from lightning_modules.gradients import full
from orchestration.stage_cache import StageCache, config_key
from orchestration.tracking import Tracker
from plumbing.distributed import broadcast, is_main, lightning_strategy, map_shards
from plumbing.errors import InputError
from plumbing.generation import generate_greedy
from plumbing.models import add_lora, trainable

log = logging.getLogger("run")
T = TypeVar("T")


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def build_task(cfg: DictConfig):
    kwargs = {k: v for k, v in plain(cfg.task).items() if k != "name"}
    return instantiate(kwargs)


class Experiment:
    """Data is read and checked in __init__ (cheap, before the model); `load_model` is separate."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir
        self.cache = StageCache(cfg.cache_dir)
        self.timings: dict[str, float] = {}
        self.resumed: dict[str, str] = {}  # stage -> the checkpoint it resumed from
        self.reused: list[str] = []  # stages and evaluations found finished in the stage cache
        self.task = build_task(cfg)
        self.splits = splits_from_config(plain(cfg.data))
        poisoned = cfg.finetune.datamodule  # checked here, before the model, as it will be built
        self.n_harmful, self.n_benign = check_poison_counts(
            self.task, self.splits, poisoned.n, poisoned.harmful_ratio
        )
        self.check_parts_against_data()
        self.check_evaluation_split()
        self.model = self.tokenizer = self.formatter = None
        self.merged_adapters: list[tuple[dict, int]] = []  # (adapter state, seed of the next one)
        self.finetune_module = None  # set by the finetune stage; a post transform may read it
        self.tracker = Tracker()  # run() sets the configured one once the input is checked

    def check_parts_against_data(self) -> None:
        """Before the model loads: a part that draws defender-held batches or calibrates on them
        needs a pool that large, and a part's own `data_problems(values, splits)` must be empty."""
        pool = len(self.splits.defender_pairs)
        for stage in ("align", "finetune"):
            part = self.cfg.defense.get(stage)
            size = None if part is None else part.get("harmful_batch_size")
            if stage in self.cfg.stages and size is not None and size > pool:
                raise InputError(
                    f"defense.{stage}.harmful_batch_size={size} exceeds the defender's pool of "
                    f"{pool} harmful pairs: lower it or raise data.n_defender"
                )
        for stage in ("align", "finetune", "post"):  # a part's own checks against the data
            part = self.cfg.defense.get(stage)
            check = (
                None if part is None else getattr(get_class(part._target_), "data_problems", None)
            )
            if stage in self.cfg.stages and check is not None:
                problems = check(plain(part), self.splits)
                if problems:
                    raise InputError("; ".join(f"defense.{stage}.{p}" for p in problems))
        post = self.cfg.defense.get("post")
        if post is not None and "calibration_samples" in post and "post" in self.cfg.stages:
            if pool == 0:
                raise InputError(
                    "defense.post needs calibration data, the defender's harmful pairs, but "
                    "data.n_defender=0: raise it"
                )

    def eval_split(self) -> str:
        """The split the evaluation reads: +eval.datamodule.split=..., `test` when absent."""
        return self.cfg.eval.datamodule.get("split", "test")

    def check_evaluation_split(self) -> None:
        """Before the model loads: the evaluation's split exists for this data and task."""
        problems = split_problems(
            self.eval_split(),
            self.cfg.eval.n_task,
            len(self.task.test),
            len(self.splits.validation_prompts),
        )
        if problems:
            raise InputError("; ".join(problems))

    def load_model(self) -> None:
        """The base model with the alignment's LoRA adapter; adapters merged by `new_adapter`
        before are merged again (FSDP's unshard rebuilds the model this way)."""
        cfg = self.cfg
        with self.timed("load_model"):
            base, self.tokenizer = instantiate(cfg.model.loader, **self.loader_cache())
            self.model = self.with_lora(base, seed=cfg.align.seed)
            for state, seed in self.merged_adapters:
                set_peft_model_state_dict(self.model, state)
                self.model = self.with_lora(self.model.merge_and_unload(), seed)
            self.formatter = PromptFormatter(
                self.tokenizer, cfg.model.template, cfg.model.max_length
            )

    def loader_cache(self) -> dict:
        """A loader that can keep what it converts (the GGUF model's dequantized weights) gets a
        folder in the stage cache for it."""
        loader = get_method(self.cfg.model.loader._target_)
        if self.cfg.cache_base_model and "cache_dir" in inspect.signature(loader).parameters:
            return {"cache_dir": str(self.cache.root / "base_model")}
        return {}

    def with_lora(self, base, seed: int):
        lora = self.cfg.model.lora
        return add_lora(
            base, lora.r, lora.alpha, lora.dropout, list(lora.target_modules), seed=seed
        ).to(self.device)

    def new_adapter(self, seed: int) -> None:
        """finetune.adapter=new: merge the current adapter into the base weights (the references'
        merge_and_unload) and wrap the result with a fresh LoRA adapter drawn from `seed`; what
        is trained and saved from now on is that adapter."""
        state = {
            k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()
        }
        self.merged_adapters.append((state, seed))
        self.model = self.with_lora(self.model.merge_and_unload(), seed)

    # --- cache keys -------------------------------------------------------------------------
    def align_key(self, with_observers: bool = True) -> str:
        """Everything that determines the aligned adapter (and what is stored with it), and nothing
        else: the configs and the alignment texts themselves (so an edit of the refusals or
        retain instructions counts), and the callbacks that observe the training."""
        cfg = self.cfg
        texts = {
            "align_prompts": self.splits.align_prompts,
            "refusals": REFUSALS,
            **({"align_answers": self.splits.align_answers} if self.splits.align_answers else {}),
            "defender": [(p.prompt, p.answer) for p in self.splits.defender_pairs],
            "retain": retain_instructions(cfg.data.n_retain, cfg.data.split_seed),
        }
        return config_key(
            {
                "model": plain(cfg.model),
                "data": plain(cfg.data),
                "align": plain(cfg.align),
                "texts": config_key(texts),
                **(self.observers("align") if with_observers else {}),
            }
        )

    def start_key(self) -> str:
        """What the fine-tuning starts from: the alignment, or the adapter file a run that starts
        later was given (its bytes), or the bare base model."""
        cfg = self.cfg
        if "align" in cfg.stages:
            return self.align_key(with_observers=False)  # a probe leaves the adapter as it is
        if cfg.checkpoint == "base":
            return config_key({"model": plain(cfg.model), "start": "base"})
        digest = hashlib.sha256(Path(cfg.checkpoint).read_bytes()).hexdigest()
        return config_key({"model": plain(cfg.model), "adapter_file": digest})

    def finetune_key(self) -> str:
        """Everything that determines the fine-tuned adapter (and the module's state, such as
        Panacea's ε): where it starts, the stage's config (the defense's part, seeds, n, the
        harmful ratio, optimizer, adapter protocol) and the data it draws from, texts included."""
        cfg = self.cfg
        texts = {
            "task_train": self.task.train,
            "user_pool": [(p.prompt, p.answer) for p in self.splits.user_pairs],
            "defender": [(p.prompt, p.answer) for p in self.splits.defender_pairs],
        }
        return config_key(
            {
                "start": self.start_key(),
                "model": plain(cfg.model),
                "data": plain(cfg.data),
                "task": plain(cfg.task),
                "finetune": plain(cfg.finetune),
                "texts": config_key(texts),
                **self.observers("finetune"),
            }
        )

    def observers(self, stage: str) -> dict:
        """The configs of the stage's callbacks that measure the training as it runs (a class with
        `observes_training = True`, such as the safety probe) and the judge they use: a stage
        trained without one cannot supply its output, so they belong in the stage's key. Empty
        (nothing added to the key) when the stage has none."""
        found = {
            name: plain(node)
            for name, node in (self.cfg.get("callbacks") or {}).items()
            if node is not None
            and stage in node.stages
            and getattr(get_class(node._target_), "observes_training", False)
        }
        if not found:
            return {}
        # the safety probe reads the evaluation's prompts; keyed only off the default split, so
        # the keys of stages trained before the split existed stay as they were
        split = {} if self.eval_split() == "test" else {"eval_split": self.eval_split()}
        return {"observers": found, "judge": plain(self.cfg.judge), **split}

    def model_fingerprint(self) -> str:
        """A hash of the model as it is now: its config, the adapters merged into it, and the
        current adapter's tensors (bytes). Equal fingerprints, equal generations."""
        digest = hashlib.sha256(json.dumps(plain(self.cfg.model), sort_keys=True).encode())
        states = [state for state, _ in self.merged_adapters]
        states.append({k: v.detach() for k, v in get_peft_model_state_dict(self.model).items()})
        for state in states:
            for name in sorted(state):
                tensor = state[name].cpu().contiguous()
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes())
            digest.update(b"|")
        return digest.hexdigest()[:16]

    def retain_samples(self) -> list[dict]:
        """Benign instructions answered by the base model, cached by model and instructions.

        Called at alignment start, when the adapter is fresh (B = 0: the model is the base model).
        """
        d = self.cfg.data
        prompts = [
            self.formatter.prompt(instruction, text)
            for instruction, text in retain_instructions(d.n_retain, d.split_seed)
        ]
        key = config_key(
            {
                "model": plain(self.cfg.model),
                "prompts": prompts,
                "max_new_tokens": d.retain_max_new_tokens,
            }
        )

        def generate(shard: list[str]) -> list[tuple[str, bool]]:
            answers, finished = generate_greedy(
                self.model,
                self.tokenizer,
                shard,
                d.retain_max_new_tokens,
                self.cfg.eval.batch_size,
                desc="retain answers (base model)",
                with_finished=True,
            )
            return list(zip(answers, finished))

        def compute() -> list[dict]:
            with self.timed("retain_generation"):
                answered = map_shards(prompts, generate)
            return [
                {"prompt": p, "answer": a, "is_harmful": False, "add_eos": f}
                for p, (a, f) in zip(prompts, answered)
            ]

        def write(folder: Path, samples: list[dict]) -> None:
            (folder / "samples.json").write_text(json.dumps(samples, indent=1))

        entry, _ = self.cached("retain", key, compute, write, meta={"n": len(prompts)})
        return json.loads((entry / "samples.json").read_text())

    def cached(
        self,
        stage: str,
        key: str,
        compute: Callable[[], T],
        write: Callable[[Path, T], None],
        meta: dict | Callable[[], dict],
    ) -> tuple[Path, bool]:
        """The cache entry (stage, key), and whether it was found finished rather than made now.
        Made: `compute()` runs on EVERY process (it may train or generate together),
        `write(folder, computed)` on rank 0, which also holds the entry's file lock throughout, so
        that parallel grid points build it once. A training `compute` checkpoints into
        `self.cache.checkpoints(stage, key)`, removed once stored."""
        with self.cache.lock(stage, key) if is_main() else nullcontext():
            entry = broadcast(self.cache.lookup(stage, key))
            found = entry is not None
            if not found:
                computed = compute()
                if is_main():
                    entry = self.cache.store(
                        stage,
                        key,
                        lambda folder: write(folder, computed),
                        meta=meta() if callable(meta) else meta,
                    )
                    shutil.rmtree(self.cache.checkpoints(stage, key), ignore_errors=True)
                entry = broadcast(entry)
        return entry, found

    # --- training -----------------------------------------------------------------------------
    def alignment_data(self) -> SupervisedDataModule:
        """conf `align.datamodule`: refusal pairs, the retain data, the defender's pairs."""
        return instantiate(self.cfg.align.datamodule)(
            splits=self.splits, formatter=self.formatter, retain=self.retain_samples()
        )

    def finetune_data(self) -> SupervisedDataModule:
        """conf `finetune.datamodule`: the user's poisoned set."""
        return instantiate(self.cfg.finetune.datamodule)(
            task=self.task, splits=self.splits, formatter=self.formatter
        )

    def evaluation_data(self) -> EvaluationDataModule:
        """conf `eval.datamodule`: the held-out harmful prompts and the task's test set (or, with
        split=validation, the validation prompts and the task's next test examples)."""
        return instantiate(self.cfg.eval.datamodule)(
            harmful_prompts=self.splits.eval_prompts,
            harmful_sources=self.splits.eval_sources,
            validation_prompts=self.splits.validation_prompts,
            task=self.task,
            formatter=self.formatter,
        )

    def module(self, stage_cfg: DictConfig):
        optimizer = instantiate(stage_cfg.optimizer)
        scheduler = instantiate(stage_cfg.scheduler) if stage_cfg.scheduler else None
        return instantiate(stage_cfg.module)(
            model=self.model,
            optimizer=optimizer,
            scheduler=scheduler,
            max_grad_norm=stage_cfg.max_grad_norm,
        )

    def fit(
        self,
        stage: str,
        module,
        datamodule,
        stage_cfg: DictConfig,
        callbacks: list,
        checkpoints: Path | None = None,
    ) -> None:
        """Train `module` for the stage's epochs; with `checkpoints` (and checkpointing enabled),
        save checkpoints there and resume from the newest one that loads."""
        L.seed_everything(stage_cfg.seed, workers=True, verbose=False)
        logger = self.tracker.stage_logger(stage)
        ckpt = self.cfg.checkpointing
        resume_from = None
        if checkpoints is not None and ckpt.enabled:
            callbacks = [
                *callbacks,
                StageCheckpoints(checkpoints, ckpt.every_n_steps, ckpt.keep_last),
            ]
            resume_from = broadcast(latest_checkpoint(checkpoints) if is_main() else None)
            if resume_from is not None:
                log.info("%s resumes from %s", stage, resume_from)
                self.resumed[stage] = Path(resume_from).name
        trainer = L.Trainer(
            **{
                **plain(self.cfg.trainer),
                "strategy": lightning_strategy(self.cfg.trainer),
                # Lightning's switch for Checkpoint callbacks (off: it would add its own)
                "enable_checkpointing": any(isinstance(c, StageCheckpoints) for c in callbacks),
            },
            max_epochs=stage_cfg.epochs,
            logger=logger,
            callbacks=callbacks,
            precision=self.cfg.model.precision,
            default_root_dir=str(self.run_dir / stage),
        )
        self.model.train()
        with self.timed(stage):
            # weights_only=False: a checkpoint holds the defenses' histories (plain Python objects)
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=False)
        if isinstance(self.model, FSDPModule):
            self.unshard_model()
        self.model.to(self.device)  # Lightning moves the model to the CPU when a fit ends
        self.model.eval()

    def unshard_model(self) -> None:
        """After an FSDP fit every process holds shards of every weight: the trained adapter is
        gathered and the plain model rebuilt around it (base weights reloaded) for what follows."""
        adapter = {n: full(p).detach().cpu() for n, p in trainable(self.model).items()}
        self.load_model()
        params = trainable(self.model)
        with torch.no_grad():
            for name, value in adapter.items():
                params[name].copy_(value)

    @property
    def device(self) -> torch.device:
        """Where the model generates: this process's GPU with a GPU trainer, else the CPU."""
        if self.cfg.trainer.get("accelerator") in ("gpu", "cuda") and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @contextmanager
    def timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0) + time.perf_counter() - start, 2)
