"""Checks of a composed config, run before any model is loaded; every problem is reported at once."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from datamodules.formatting import TEMPLATES
from evaluation.statistics import check_level
from lightning_modules.checks import integer_problems, is_integer, is_number
from plumbing.errors import InputError

STAGES = ["align", "finetune", "post", "eval"]
ADAPTER_PROTOCOLS = ("continue", "new")


class ConfigError(InputError):
    """The composed configuration cannot run; the message lists each problem and its fix."""


def config_problems(cfg: DictConfig, hardware: bool = True) -> list[str]:
    """Every problem of the config; `hardware=False` leaves out those of the machine it runs
    on (the GPUs), for checks made on another host, such as a sweeper submitting to SLURM."""
    problems = []
    p = cfg.harmful_ratio
    if not is_number(p) or not 0 <= p <= 1:
        problems.append(f"harmful_ratio={p!r} must be a number in [0, 1] (e.g. harmful_ratio=0.1)")

    stages = list(cfg.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        problems.append(f"stages={stages} must be a non-empty subset of {STAGES}")
    elif stages != sorted(set(stages), key=STAGES.index):
        problems.append(f"stages={stages} must be in pipeline order {STAGES}, each at most once")
    elif stages[0] != "align":
        if cfg.checkpoint is None:
            problems.append(
                f"stages start at '{stages[0]}', which needs an adapter: pass checkpoint=PATH "
                "(a .safetensors adapter, e.g. a run's adapters/deployed.safetensors) or checkpoint=base"
            )
        elif cfg.checkpoint != "base" and not Path(cfg.checkpoint).is_file():
            problems.append(f"checkpoint={cfg.checkpoint} is not a file")
    elif cfg.checkpoint is not None:
        problems.append("checkpoint= is used only when stages do not start with align; drop it")

    sizes = (
        "align.batch_size",
        "align.epochs",
        "finetune.batch_size",
        "finetune.epochs",
        "finetune.n",
        "eval.n_task",
        "eval.batch_size",
        "eval.harmful_max_new_tokens",
        "eval.task_max_new_tokens",
        "model.max_length",
    )
    problems += integer_problems({key: _select(cfg, key) for key in sizes}, least=1)
    if isinstance(cfg.eval.n_task, int) and cfg.eval.n_task > cfg.task.n_test:
        problems.append(f"eval.n_task={cfg.eval.n_task} exceeds task.n_test={cfg.task.n_test}")
    try:
        check_level(cfg.eval.interval_level)
    except InputError as err:
        problems.append(str(err))
    post, finetune = cfg.defense.get("post"), cfg.defense.get("finetune")
    if (
        post is not None
        and post.get("_target_", "").endswith("AddPanaceaEpsilon")
        and not (finetune or {}).get("_target_", "").endswith("PanaceaModule")
    ):
        problems.append(
            "defense/post=panacea_epsilon adds the ε that Panacea's fine-tuning learns: use it with "
            "defense/finetune=panacea"
        )
    adapter = cfg.finetune.adapter
    if adapter not in ADAPTER_PROTOCOLS:
        problems.append(
            f"finetune.adapter={adapter!r} must be one of {list(ADAPTER_PROTOCOLS)} "
            "(continue: train the alignment adapter on; new: merge it and train a fresh one)"
        )
    elif adapter == "new" and stages and stages[0] not in ("align", "finetune"):
        problems.append(
            "finetune.adapter=new: a fine-tuned adapter file then holds only the fresh LoRA over the "
            "base with the aligned adapter merged, so it cannot be loaded on its own for "
            f"stages={stages}; evaluate it in the run that fine-tunes it, or set finetune.adapter=continue"
        )
    for stage in ("align", "finetune"):
        norm = cfg[stage].max_grad_norm
        if norm is not None and (not is_number(norm) or norm <= 0):
            problems.append(
                f"{stage}.max_grad_norm={norm!r} must be a number > 0, or null (no clipping)"
            )
    problems += checkpointing_problems(cfg)
    problems += training_problems(cfg)
    problems += judge_problems(cfg)
    problems += hyperparameter_problems(cfg)
    if cfg.model.template not in TEMPLATES:
        problems.append(f"model.template={cfg.model.template!r} must be one of {list(TEMPLATES)}")
    if hardware:
        problems += hardware_problems(cfg)
    return problems


def hardware_problems(cfg: DictConfig) -> list[str]:
    """The GPUs the trainer asks for, against those this machine has."""
    if cfg.trainer.get("accelerator") not in ("gpu", "cuda"):
        return []
    import torch

    devices = cfg.trainer.get("devices", 1)
    if not torch.cuda.is_available():
        return [
            "the trainer asks for GPUs but none is visible: use trainer=cpu, ddp_cpu or fsdp_cpu"
        ]
    if isinstance(devices, int) and devices > torch.cuda.device_count():
        return [f"trainer.devices={devices} but this node has {torch.cuda.device_count()} GPUs"]
    return []


def _select(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None)


def training_problems(cfg: DictConfig) -> list[str]:
    """Values that would otherwise fail only when a stage starts (a negative seed), or not at all
    (lr=0 trains nothing; a negative n_retain takes every retain sample)."""
    problems = []
    seeds = ("seed", "align.seed", "finetune.seed", "finetune.sample_seed", "data.split_seed")
    problems += integer_problems({key: _select(cfg, key) for key in seeds}, optional=True)
    for stage in ("align", "finetune"):
        optimizer = cfg[stage].optimizer
        lr, decay = optimizer.get("lr"), optimizer.get("weight_decay", 0.0)
        if lr is not None and (not is_number(lr) or lr <= 0):
            problems.append(f"{stage}.optimizer.lr={lr!r} must be a number > 0")
        if not is_number(decay) or decay < 0:
            problems.append(f"{stage}.optimizer.weight_decay={decay!r} must be a number >= 0")
    lora = cfg.model.lora
    problems += integer_problems({"model.lora.r": lora.r}, least=1)
    if not is_number(lora.alpha) or lora.alpha <= 0:
        problems.append(f"model.lora.alpha={lora.alpha!r} must be a number > 0")
    if not is_number(lora.dropout) or not 0 <= lora.dropout < 1:
        problems.append(f"model.lora.dropout={lora.dropout!r} must be a number in [0, 1)")
    problems += integer_problems({"data.n_retain": _select(cfg, "data.n_retain")}, optional=True)
    for name, callback in (cfg.get("callbacks") or {}).items():
        if callback is None:
            continue
        if not set(callback.get("stages", [])) <= {"align", "finetune"}:
            problems.append(
                f"callbacks.{name}.stages={list(callback.stages)} must name training stages: "
                "align, finetune"
            )
        check = getattr(get_class(callback._target_), "hyperparameter_problems", None)
        if check is not None:
            values = OmegaConf.to_container(callback, resolve=True)
            problems += [f"callbacks.{name}.{message}" for message in check(values)]
    return problems


def judge_problems(cfg: DictConfig) -> list[str]:
    """The judge is built at the first evaluation, after alignment: its values are checked now.
    A threshold outside [0, 1] would silently make every answer harmful or none."""
    judge, problems = cfg.judge, []
    threshold = judge.get("threshold")
    if threshold is not None and (not is_number(threshold) or not 0 <= threshold <= 1):
        problems.append(f"judge.threshold={threshold!r} must be a number in [0, 1]")
    share = judge.get("max_repeat_share")
    if share is not None and (not is_number(share) or not 0 < share <= 1):
        problems.append(f"judge.max_repeat_share={share!r} must be a number in (0, 1]")
    for key, least in (("batch_size", 1), ("window", 1), ("ngram", 1), ("min_words", 0)):
        problems += integer_problems({f"judge.{key}": judge.get(key)}, least, optional=True)
    return problems


def checkpointing_problems(cfg: DictConfig) -> list[str]:
    c = cfg.checkpointing
    problems = []
    if c.every_n_steps is not None and (not is_integer(c.every_n_steps) or c.every_n_steps < 1):
        problems.append(
            f"checkpointing.every_n_steps={c.every_n_steps!r} must be an integer >= 1, or null "
            "(a checkpoint after each epoch's last step only)"
        )
    problems += integer_problems({"checkpointing.keep_last": c.keep_last}, least=1)
    if c.enabled and cfg.trainer.get("strategy") == "fsdp2":
        problems.append(
            "checkpoints inside the stages are not supported under FSDP2 yet (the adapter and the "
            "defenses' state are sharded; resuming would need a distributed checkpoint): add "
            "checkpointing.enabled=false, or train with trainer=ddp"
        )
    return problems


def hyperparameter_problems(cfg: DictConfig) -> list[str]:
    """Each defense part's own checks of its values (a module's `hyperparameter_problems`), run on
    the config so that a bad value is reported before the model loads."""
    problems = []
    for stage in ("align", "finetune", "post"):
        part = cfg.defense.get(stage)
        if part is None:
            continue
        check = getattr(get_class(part._target_), "hyperparameter_problems", None)
        if check is not None:
            values = {k: v for k, v in OmegaConf.to_container(part, resolve=True).items()}
            problems += [f"defense.{stage}.{message}" for message in check(values)]
    return problems


def validate_config(cfg: DictConfig) -> None:
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
