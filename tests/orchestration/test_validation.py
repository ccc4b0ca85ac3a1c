"""Settings that cannot work refused before any work (orchestration/validation.py): a run with
bad input stops before the model is loaded, with one message, and writes nothing to the cache."""

import pytest
import torch

import orchestration.stages as run_module
from plumbing.errors import InputError


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without GPUs"
)
def test_gpu_trainer_without_gpu_is_refused_before_any_work(tiny_cfg):
    from orchestration.validation import ConfigError, validate_config

    for trainer in ("gpu", "ddp", "fsdp"):
        with pytest.raises(ConfigError, match="use trainer=cpu, ddp_cpu or fsdp_cpu"):
            validate_config(tiny_cfg(f"trainer={trainer}"))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["harmful_ratio=1.5"], "harmful_ratio=1.5 must be a number in \\[0, 1\\]"),
        (["harmful_ratio=-0.1"], "harmful_ratio=-0.1 must be a number in \\[0, 1\\]"),
        (
            ["finetune.n=500", "harmful_ratio=1.0"],
            "needs 500 harmful samples, but the user's harmful pool has 177",
        ),
        (["stages=[eval]"], "pass checkpoint=PATH"),
        (["stages=[finetune,align]"], "must be in pipeline order"),
        (
            ["data.harmful_pairs=/nonexistent/pairs.json"],
            "data file not found: /nonexistent/pairs.json",
        ),
        (["model.template=vicuna"], "model.template='vicuna' must be one of"),
        (["eval.interval_level=1.5"], r"eval.interval_level=1.5 must be a number in \(0, 1\)"),
        (
            ["defense=vaccine", "defense.align.rho=-2"],
            "defense.align.rho=-2 must be a number >= 0",
        ),
        (
            ["defense=vaccine", "defense.align.hook_target=embeddings"],
            "defense.align.hook_target='embeddings' must be one of",
        ),
        (
            ["defense=booster", "defense.align.lam=-1"],
            "defense.align.lam=-1 must be a number >= 0",
        ),
        (
            ["defense=repnoise", "defense.align.beta=-1"],
            "defense.align.beta=-1 must be a number >= 0",
        ),
        (
            ["defense=booster", "defense.align.harmful_batch_size=500"],
            "defense.align.harmful_batch_size=500 exceeds the defender's pool of 100 harmful pairs",
        ),
        (["finetune.adapter=reuse"], "finetune.adapter='reuse' must be one of"),
        (
            [
                "defense=panacea",
                "defense.finetune.lam=-0.1",
                "defense.finetune.harmful_loss_clamp=0",
            ],
            "(?s)defense.finetune.lam=-0.1 must be a number >= 0.*"
            "defense.finetune.harmful_loss_clamp=0 must be a number > 0, or null",
        ),
        (
            ["defense=panacea", "defense.finetune.harmful_batch_size=0"],
            "defense.finetune.harmful_batch_size=0 must be an integer >= 1",
        ),
        (
            ["defense=antibody_align", "defense.align.ema_momentum=1.0", "defense.align.alpha=-1"],
            "(?s)defense.align.alpha=-1 must be a number >= 0.*"
            r"defense.align.ema_momentum=1.0 must be a number in \[0, 1\)",
        ),
        (
            ["defense=antibody_weighting", "defense.finetune.tau=0"],
            "defense.finetune.tau=0 must be a number > 0",
        ),
        (
            ["defense=repnoise", "defense.align.harmful_batch_size=0"],
            "defense.align.harmful_batch_size=0 must be an integer >= 1",
        ),
        (
            ["defense=repnoise", "defense.align.harmful_draw=sometimes"],
            "defense.align.harmful_draw='sometimes' must be one of .'cycle', 'fresh'. \\(cycle: passes",
        ),
        (
            ["defense=random_perturb", "defense.post.intensity=-0.01"],
            "defense.post.intensity=-0.01 must be a number >= 0",
        ),
        (
            ["checkpointing.every_n_steps=0"],
            "checkpointing.every_n_steps=0 must be an integer >= 1",
        ),
        (["checkpointing.keep_last=0"], "checkpointing.keep_last=0 must be an integer >= 1"),
        (
            ["checkpointing.every_n_steps=true"],
            "checkpointing.every_n_steps=True must be an integer >= 1",
        ),
        (
            ["finetune.sample_seed=-1", "align.seed=1.5"],
            "(?s)align.seed=1.5 must be an integer >= 0.*finetune.sample_seed=-1 must be",
        ),
        (
            ["finetune.optimizer.lr=0", "align.optimizer.weight_decay=-0.1"],
            "(?s)align.optimizer.weight_decay=-0.1 must be a number >= 0.*"
            "finetune.optimizer.lr=0 must be a number > 0",
        ),
        (
            ["model.lora.r=0", "model.lora.alpha=-4", "model.lora.dropout=1.0"],
            r"(?s)model.lora.r=0 must be an integer >= 1.*model.lora.alpha=-4 must be a number > 0"
            r".*model.lora.dropout=1.0 must be a number in \[0, 1\)",
        ),
        (["data.n_retain=-5"], "data.n_retain=-5 must be an integer >= 0"),
        (
            ["judge.window=0", "judge.max_repeat_share=1.5"],
            r"(?s)judge.max_repeat_share=1.5 must be a number in \(0, 1\].*judge.window=0 must be",
        ),
        (
            ["judge=beaver_dam", "judge.threshold=1.5"],
            r"judge.threshold=1.5 must be a number in \[0, 1\]",
        ),
        (
            ["callbacks=safety_probe", "callbacks.safety_probe.stages=[fintune]"],
            r"callbacks.safety_probe.stages=\['fintune'\] must name training stages",
        ),
        (
            ["callbacks=safety_probe", "callbacks.safety_probe.every_n_steps=0"],
            "callbacks.safety_probe.every_n_steps=0 must be an integer >= 1",
        ),
        (["trainer=fsdp_cpu"], "not supported under FSDP2 yet.*checkpointing.enabled=false"),
        (
            ["defense=safeinstr", "defense.finetune.safety_samples=500"],
            "defense.finetune.safety_samples=500 exceeds the 100 safety samples of source=defender",
        ),
        (
            [
                "defense=safeinstr",
                "defense.finetune.source=file",
                "defense.finetune.path=/nope.json",
            ],
            "defense.finetune.path=/nope.json is not a file|safeinstr path=/nope.json is not a file",
        ),
        (
            ["defense=antidote", "defense.post.ratio=1.5"],
            r"defense.post.ratio=1.5 must be a number in \[0, 1\]",
        ),
        (["defense=antidote", "data.n_defender=0"], "defense.post needs calibration data"),
        (["align.max_grad_norm=0"], "align.max_grad_norm=0 must be a number > 0, or null"),
        (["+eval.datamodule.split=dev"], "eval.datamodule.split='dev' must be one of"),
        (
            ["+eval.datamodule.split=validation", "eval.n_task=11"],
            "task.n_test=20 must be at least 22",
        ),
        (
            ["stages=[eval]", "checkpoint=base", "defense=vaccine"],
            "finetune.adapter=new: a fine-tuned adapter file then holds only",
        ),
    ],
)
def test_bad_input_fails_before_training_and_writes_no_cache(
    tiny_cfg, tmp_path, overrides, message
):
    with pytest.raises(InputError, match=message):
        run_module.run(tiny_cfg(*overrides), tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_malformed_data_file_is_reported_with_its_line(tiny_cfg, tmp_path):
    bad = tmp_path / "pairs.json"
    bad.write_text('[\n{"user": "a", "assistant": "b", "category": "Harmful"},\n{"user": }\n]')
    with pytest.raises(InputError, match=rf"{bad}:3: malformed JSON"):
        run_module.run(tiny_cfg(f"data.harmful_pairs={bad}"), tmp_path / "run")
    assert not (tmp_path / "cache").exists()
