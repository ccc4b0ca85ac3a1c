"""Defenses compose by stage (conf/defense/{align,finetune,post}/): the presets pick parts, any
combination runs without a new file, and each hyperparameter is written once."""

import json

import pytest
import yaml

import orchestration.stages as stages
from helpers.configs import ROOT
from orchestration.validation import ConfigError, validate_config

CONF_DIR = ROOT / "conf"

PRESETS = {  # preset -> the class of its (align, finetune, post) parts
    "sft": ("CausalLMModule", "CausalLMModule", None),
    "panacea": ("CausalLMModule", "PanaceaModule", "AddPanaceaEpsilon"),
    "panacea_tuned": ("CausalLMModule", "PanaceaModule", "AddPanaceaEpsilon"),
    "random_perturb": ("CausalLMModule", "CausalLMModule", "AddGaussianNoise"),
    "antibody": ("AntibodyAlignModule", "WeightedSFTModule", None),
    "antibody_align": ("AntibodyAlignModule", "CausalLMModule", None),
    "antibody_weighting": ("CausalLMModule", "WeightedSFTModule", None),
    "vaccine": ("VaccineModule", "CausalLMModule", None),
    "repnoise": ("RepNoiseModule", "CausalLMModule", None),
    "booster": ("BoosterModule", "CausalLMModule", None),
    "t_vaccine": ("TVaccineModule", "CausalLMModule", None),
    "antidote": ("CausalLMModule", "CausalLMModule", "AntidotePrune"),
    "lisa": ("CausalLMModule", "LisaModule", None),
    "lisa_scaled": ("CausalLMModule", "LisaModule", None),
    "safeinstr": ("CausalLMModule", "SafeInstrModule", None),
    "ldifs": ("CausalLMModule", "LDIFSModule", None),
}
# the fine-tuning stage's adapter after each alignment, as the reference scripts run it
NEW_ADAPTER = {"vaccine", "repnoise", "t_vaccine", "antidote", "lisa", "lisa_scaled", "ldifs"}


def test_lisa_scaled_is_lisa_with_the_references_cycle_at_1_to_9(tiny_cfg):
    lisa, scaled = (
        tiny_cfg("defense=lisa").finetune.module,
        tiny_cfg("defense=lisa_scaled").finetune.module,
    )
    assert (lisa.align_steps, lisa.finetune_steps) == (100, 900)
    assert (scaled.align_steps, scaled.finetune_steps) == (1, 9)
    assert {**scaled, "align_steps": 100, "finetune_steps": 900} == {**lisa}


def test_panacea_tuned_is_panacea_at_the_rho_its_committed_study_picked(tiny_cfg):
    study = json.loads((ROOT / "docs" / "tune_panacea_rho" / "tuning.json").read_text())
    panacea = tiny_cfg("defense=panacea").finetune.module
    tuned = tiny_cfg("defense=panacea_tuned").finetune.module
    assert tuned.rho == study["picked"]["params"]["defense.finetune.rho"] != panacea.rho
    assert {**tuned, "rho": panacea.rho} == {**panacea}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_pick_one_part_per_stage(tiny_cfg, preset):
    cfg = tiny_cfg(f"defense={preset}")
    parts = stages.defense_parts(cfg)
    assert (parts["align"], parts["finetune"], parts["post"]) == PRESETS[preset]
    assert cfg.align.module == cfg.defense.align and cfg.finetune.module == cfg.defense.finetune
    assert cfg.post == cfg.defense.post and cfg.defense.name == preset
    assert cfg.finetune.adapter == ("new" if preset in NEW_ADAPTER else "continue")


@pytest.mark.parametrize(
    "setting,vaccine_rho,repnoise,booster",
    [
        (None, 2.0, (1.0, 0.001), (5.0, 0.1, 10)),  # each method's own repository
        ("panacea_paper", 20.0, (0.02, 0.1), (100.0, 0.01, 10)),
        ("antibody_paper", 5.0, (0.1, 0.001), (5.0, 0.1, 16)),
    ],
)
def test_baselines_take_the_values_of_the_papers_scripts(
    tiny_cfg, setting, vaccine_rho, repnoise, booster
):
    extra = [f"setting={setting}", "model=tiny"] if setting else []
    assert tiny_cfg("defense=vaccine", *extra).align.module.rho == vaccine_rho
    r = tiny_cfg("defense=repnoise", *extra).align.module
    assert (r.alpha, r.beta) == repnoise
    b = tiny_cfg("defense=booster", *extra).align.module
    assert (b.lam, b.alpha, b.harmful_batch_size) == booster
    assert tiny_cfg("defense=vaccine", *extra, "defense.align.rho=3").align.module.rho == 3
    lisa = tiny_cfg("defense=lisa", *extra)
    assert (lisa.finetune.module.rho, lisa.finetune.adapter) == {
        None: (1.0, "new"),
        "panacea_paper": (0.01, "new"),
        "antibody_paper": (0.01, "continue"),
    }[setting]


@pytest.mark.parametrize("preset,key", [("repnoise", "noise_seed"), ("t_vaccine", "layer_seed")])
def test_a_defense_s_random_draws_follow_the_run_s_alignment_seed(tiny_cfg, preset, key):
    """Seeds 0, 1, 2 of a grid draw different noise (or layers), as the references' runs did."""
    assert tiny_cfg(f"defense={preset}", "seed=2").align.module[key] == 2
    assert tiny_cfg(f"defense={preset}", "seed=2", "align.seed=5").align.module[key] == 5


def test_part_hyperparameters_are_overridden_by_short_paths(tiny_cfg):
    cfg = tiny_cfg("defense=antibody", "defense.align.alpha=0.3", "defense.finetune.tau=2.0")
    assert cfg.align.module.alpha == 0.3 and cfg.finetune.module.tau == 2.0
    assert tiny_cfg("defense=panacea", "defense.finetune.rho=0.1").finetune.module.rho == 0.1
    assert tiny_cfg("defense=random_perturb", "defense.post.intensity=0.5").post.intensity == 0.5


@pytest.mark.parametrize("drop", ["defense.post=null", "~defense/post"])
@pytest.mark.parametrize("preset", [p for p, parts in PRESETS.items() if parts[2] is not None])
def test_a_post_part_is_dropped_with_null_or_by_removing_the_group(tiny_cfg, preset, drop):
    cfg = tiny_cfg(f"defense={preset}", drop)
    assert cfg.post is None and stages.defense_parts(cfg)["post"] is None
    assert stages.defense_parts(cfg)["finetune"] == PRESETS[preset][1]


def test_each_part_value_is_written_once():
    """Antibody's alignment values live in one file that both presets using it include."""
    for preset in ("antibody", "antibody_align"):
        text = (CONF_DIR / "defense" / f"{preset}.yaml").read_text()
        assert "alpha" not in text and "- align: antibody" in text
    recipe_keys = set(yaml.safe_load((CONF_DIR / "recipe" / "papers.yaml").read_text()))
    for model in ("llama2_7b", "gemma2_9b", "qwen2_7b", "qwen2_5_0_5b"):
        own = yaml.safe_load((CONF_DIR / "model" / f"{model}.yaml").read_text())
        assert (
            not {"template", "max_length", "lora", "precision"} & set(own)
            and "precision" in recipe_keys
        )


def test_gpu_trainer_composes_the_cpu_one(tiny_cfg):
    cpu, gpu = tiny_cfg("trainer=cpu").trainer, tiny_cfg("trainer=gpu").trainer
    assert gpu.accelerator == "gpu" and {**cpu, "accelerator": "gpu"} == dict(gpu)


def test_epsilon_without_panacea_fine_tuning_is_refused_before_the_model(tiny_cfg):
    with pytest.raises(
        ConfigError, match="defense/post=panacea_epsilon .* defense/finetune=panacea"
    ):
        validate_config(tiny_cfg("defense=sft", "defense/post=panacea_epsilon"))


@pytest.mark.e2e
def test_antibody_alignment_with_panacea_fine_tuning_runs_without_a_new_file(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "defense=sft",
        "defense/align=antibody",
        "defense/finetune=panacea",
        "defense/post=panacea_epsilon",
        "defense.finetune.harmful_batch_size=4",
        "defense.name=antibody_align+panacea",
    )
    results = stages.run(cfg, tmp_path / "run")
    assert results["defense"] == "antibody_align+panacea"
    assert results["defense_parts"] == {
        "align": "AntibodyAlignModule",
        "finetune": "PanaceaModule",
        "post": "AddPanaceaEpsilon",
    }
    assert (
        results["align_diagnostics"]["steps"] > 0
        and results["finetune_diagnostics"]["epsilon_norm"] > 0
    )
    assert "before_post_harmful_score" in results
    assert (tmp_path / "run" / "finetune_diagnostics" / "epsilon_layer_norms.png").is_file()


@pytest.mark.e2e
def test_booster_alignment_with_lisa_fine_tuning_runs_without_a_new_file(tiny_cfg, tmp_path):
    """A combination the Antibody repository's scripts run (Booster alignment + Lisa), from parts."""
    cfg = tiny_cfg(
        "defense=sft",
        "defense/align=booster",
        "defense/finetune=lisa",
        "defense.finetune.align_steps=1",
        "defense.finetune.finetune_steps=1",
        "defense.name=booster+lisa",
    )
    results = stages.run(cfg, tmp_path / "run")
    assert results["defense_parts"] == {
        "align": "BoosterModule",
        "finetune": "LisaModule",
        "post": None,
    }
    assert results["stage_config"]["finetune"]["module"]["rho"] == 1.0
    assert "harmful_score" in results and results["finetune_adapter"] == "continue"
