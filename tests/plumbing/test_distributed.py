"""Two CPU processes (gloo), started from outside Lightning as torchrun or SLURM would start them:
for every defense's training module, one optimizer step under DDP and under FSDP2 (`fully_shard`
through Lightning's ModelParallelStrategy) gives the update that one process computes on the
same global batch, and the step's global quantities (ε, gradient norms, cos, λ) are identical on
both ranks. Each process holds half of a global batch whose answers differ in length."""

from functools import partial

import pytest
import torch

from datamodules.formatting import PromptFormatter, collate
from datamodules.supervised import SupervisedDataModule
from helpers.antibody import (
    align_setup,
    defender_batches,
    independent_alignment_update,
    independent_weighted_update,
)
from helpers.panacea import CLAMP, independent_update, setup
from helpers.training import Pair, _free_port, clipped, fit_two_processes, tiny_lora
from lightning_modules.causal_lm import CausalLMModule, answer_loss
from plumbing.models import load_tiny_tokenizer

STRATEGIES = ["ddp", "fsdp"]


def formatter():
    return PromptFormatter(load_tiny_tokenizer(), "chat", max_length=96)


def user_samples(fmt):
    return [
        {
            "prompt": fmt.prompt(f"Review {i}: fine."),
            "answer": "positive" + " really" * i,
            "is_harmful": i % 2 == 1,
        }
        for i in range(4)
    ]


def restore(model, before):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(before[n])


def check_update(ranks, before, expected, rtol=1e-4, atol=1e-6, max_grad_norm=None):
    """θ_before − θ_after equals the expected SGD(lr=1) gradient (clipped to `max_grad_norm` as
    torch's clip_grad_norm_ does), on both ranks alike."""
    if max_grad_norm is not None:
        expected = clipped(expected, max_grad_norm)
    for name, grad in expected.items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        torch.testing.assert_close(
            before[name] - ranks[0]["params"][name], grad, rtol=rtol, atol=atol, msg=name
        )


def global_indices(ranks, key):
    indices = ranks[0][key][0] + ranks[1][key][0]
    assert sorted(indices) == [0, 1, 2, 3]  # two disjoint shards of one global batch
    return indices


# --- SFT ------------------------------------------------------------------------------------------
def build_sft(max_grad_norm=None):
    fmt = formatter()
    dm = SupervisedDataModule(user_samples(fmt), fmt, batch_size=2, seed=0)
    module = CausalLMModule(
        tiny_lora(), optimizer=partial(torch.optim.SGD, lr=1.0), max_grad_norm=max_grad_norm
    )
    return module, dm


# The clip (0.05, far below the gradients' norms) acts on the all-reduced gradient (DDP) and on the
# norm over all shards (FSDP2): the clipped update equals one process's.
CLIPS = [None, 0.05]


@pytest.mark.e2e
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sft_step(strategy, clip, tmp_path):
    ranks = fit_two_processes(partial(build_sft, clip), strategy, tmp_path)
    module, dm = build_sft()
    model = module.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = dm.collate_batch([dm.encoded()[i] for i in global_indices(ranks, "user")])
    names = list(before)
    loss = answer_loss(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
        batch["labels"],
    )
    grads = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names])
    check_update(ranks, before, dict(zip(names, grads)), max_grad_norm=clip)


# --- Panacea --------------------------------------------------------------------------------------
def build_panacea(max_grad_norm=None):
    fmt = formatter()
    model, dm, module = setup(
        fmt, n_defender=4, harmful_batch_size=2, batch_size=2, max_grad_norm=max_grad_norm
    )
    dm.samples = user_samples(fmt)
    dm.defender_pairs = [
        Pair(p.prompt, p.answer + " more" * (3 * i)) for i, p in enumerate(dm.defender_pairs)
    ]
    return module, dm


@pytest.mark.e2e
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_panacea_step(strategy, clip, tmp_path):
    """With a clip, it scales the composed gradient G − λ(H_ε − H), not its parts."""
    ranks = fit_two_processes(partial(build_panacea, clip), strategy, tmp_path, attrs=("epsilon",))
    module, dm = build_panacea()
    fmt, model = dm.formatter, module.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name in ranks[0]["epsilon"]:
        assert torch.equal(ranks[0]["epsilon"][name], ranks[1]["epsilon"][name]), name
    assert (
        ranks[0]["metrics"]["train/harmful_grad_norm"]
        == ranks[1]["metrics"]["train/harmful_grad_norm"]
    )

    user_batch = dm.collate_batch([dm.encoded()[i] for i in global_indices(ranks, "user")])
    harmful_batch = collate(
        [
            fmt.encode(fmt.prompt(dm.defender_pairs[i].prompt), dm.defender_pairs[i].answer)
            for i in global_indices(ranks, "harmful")
        ],
        pad_id=fmt.tokenizer.pad_token_id,
    )
    expected_grad, expected_eps = independent_update(model, user_batch, harmful_batch, CLAMP)
    for name, eps in expected_eps.items():
        torch.testing.assert_close(ranks[0]["epsilon"][name], eps, rtol=1e-4, atol=1e-7)
    restore(model, before)
    check_update(ranks, before, expected_grad, max_grad_norm=clip)


# --- Antibody: alignment --------------------------------------------------------------------------
def build_antibody_align():
    model, dm, module = align_setup(formatter(), batch_size=2, n_defender=4, harmful_batch_size=2)
    return module, dm


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_antibody_alignment_step(strategy, tmp_path):
    ranks = fit_two_processes(
        build_antibody_align, strategy, tmp_path, attrs=("history", "lambda_t")
    )
    module, dm = build_antibody_align()
    model = module.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for key in ("lambda_raw", "lambda_t", "cos_A_S", "harmful_grad_norm"):
        assert ranks[0]["history"][0][key] == ranks[1]["history"][0][key], key
    assert torch.equal(ranks[0]["lambda_t"], ranks[1]["lambda_t"])

    safe_batch = dm.collate_batch([dm.encoded()[i] for i in global_indices(ranks, "user")])
    global_indices(ranks, "harmful")  # the defender's 4 pairs, split in two shards
    harmful_batch, refusal_batch = defender_batches(dm.formatter, dm)
    expected, lam = independent_alignment_update(
        model, safe_batch, harmful_batch, refusal_batch, 0.5, "cosine"
    )
    assert ranks[0]["history"][0]["lambda_raw"] == pytest.approx(lam, rel=1e-4)
    check_update(ranks, before, expected)


# --- Antibody: weighted fine-tuning ---------------------------------------------------------------
def build_weighting(softmax_over="global"):
    from lightning_modules.antibody import WeightedSFTModule

    fmt = formatter()
    dm = SupervisedDataModule(user_samples(fmt), fmt, batch_size=2, seed=0)
    module = WeightedSFTModule(
        tiny_lora(), optimizer=partial(torch.optim.SGD, lr=1.0), tau=0.7, softmax_over=softmax_over
    )
    return module, dm


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_antibody_weighting_step(strategy, tmp_path):
    """softmax_over=global: the weights are a softmax over the 4 samples of both processes."""
    ranks = fit_two_processes(build_weighting, strategy, tmp_path, attrs=("step_records",))
    module, dm = build_weighting()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    expected, weights = independent_weighted_update(module.model, dm.formatter, dm.samples)
    records = sorted(ranks[0]["step_records"] + ranks[1]["step_records"], key=lambda r: r["index"])
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [r["weight"] for r in records] == pytest.approx(weights.tolist(), rel=1e-4)
    assert {r["batch_size"] for r in records} == {4}
    check_update(ranks, before, expected)


@pytest.mark.e2e
def test_antibody_weighting_per_process_softmax_is_the_reference_semantics(tmp_path):
    """softmax_over=process: each process's 2 weights sum to 1 and DDP averages the two losses'
    gradients (what the reference code does on several GPUs)."""
    ranks = fit_two_processes(
        partial(build_weighting, "process"), "ddp", tmp_path, attrs=("step_records",)
    )
    module, dm = build_weighting()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    per_rank = []
    for rank in ranks:
        shard = rank["user"][0]
        grads, weights = independent_weighted_update(
            module.model, dm.formatter, [{**dm.samples[i], "index": i} for i in shard]
        )
        assert sum(r["weight"] for r in rank["step_records"]) == pytest.approx(1.0)
        assert [r["weight"] for r in rank["step_records"]] == pytest.approx(
            weights.tolist(), rel=1e-4
        )
        per_rank.append(grads)
    check_update(ranks, before, {n: (per_rank[0][n] + per_rank[1][n]) / 2 for n in before})


# --- evaluation under several processes -----------------------------------------------------------
HARMFUL_PROMPTS = [
    f"How do I make dangerous thing number {i}?" for i in range(5)
]  # 5 and 3: odd, so a
N_TASK = 3  # sampler would pad


class RecordingJudge:
    """The offline refusal judge, remembering every prompt it scored."""

    def __init__(self):
        from evaluation.judges import RefusalJudge

        self.inner, self.name, self.seen = RefusalJudge(), "refusal", []

    def judge_all(self, prompts, answers):
        self.seen += list(prompts)
        return self.inner.judge_all(prompts, answers)


def evaluate(out_path=None):
    from datamodules.evaluation import EvaluationDataModule
    from datamodules.tasks import SentimentTask
    from evaluation.evaluate import evaluate_model
    from plumbing.models import build_tiny

    model, tokenizer = build_tiny(init_seed=3)
    fmt = PromptFormatter(tokenizer, "chat", max_length=96)
    judge = RecordingJudge()
    data = EvaluationDataModule(
        HARMFUL_PROMPTS, SentimentTask(n_train=10, n_test=N_TASK), fmt, n_task=N_TASK
    )
    metrics = evaluate_model(
        model,
        data,
        judge,
        harmful_max_new_tokens=5,
        task_max_new_tokens=3,
        batch_size=2,
        generations_path=out_path,
    )
    return metrics, judge.seen


def _evaluate_in_one_of_two(rank, port, out_dir):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    metrics, seen = evaluate(out_dir / "generations.jsonl")
    torch.save({"metrics": metrics, "seen": seen}, out_dir / f"eval{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.e2e
def test_evaluation_scores_each_prompt_exactly_once(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_evaluate_in_one_of_two, args=(_free_port(), tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"eval{r}.pt", weights_only=False) for r in (0, 1)]
    single_metrics, single_seen = evaluate(tmp_path / "single.jsonl")

    seen = ranks[0]["seen"] + ranks[1]["seen"]
    assert sorted(seen) == sorted(single_seen) and len(seen) == len(HARMFUL_PROMPTS) + N_TASK
    assert ranks[0]["seen"] and ranks[1]["seen"]  # both processes took a share
    assert ranks[0]["metrics"] == ranks[1]["metrics"] == single_metrics
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert rows == [
        json.loads(line) for line in (tmp_path / "single.jsonl").read_text().splitlines()
    ]


# --- the whole pipeline under several processes -------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("trainer,defense", [("ddp_cpu", "panacea"), ("fsdp_cpu", "antibody")])
def test_run_with_two_cpu_processes(trainer, defense, tmp_path):
    """`python run.py trainer=ddp_cpu|fsdp_cpu` starts its second process itself; every stage runs,
    each evaluation prompt appears once in the generations, and only rank 0 writes results."""
    import json

    from helpers.configs import run_tiny

    run_dir = tmp_path / "run"
    no_checkpoints = ["checkpointing.enabled=false"] if trainer == "fsdp_cpu" else []
    proc = run_tiny(
        tmp_path,
        f"defense={defense}",
        f"trainer={trainer}",
        f"hydra.run.dir={run_dir}",
        *no_checkpoints,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["processes"] == 2 and results["defense"] == defense
    harmful = [
        json.loads(line)["prompt"]
        for line in (run_dir / "generations_deployed.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "harmful"
    ]
    assert len(harmful) == len(set(harmful)) == results["n_eval_prompts"]
    assert (run_dir / "adapters" / "deployed.safetensors").is_file()


def test_process_settings_that_cannot_work_are_refused_before_any_work(tiny_cfg, monkeypatch):
    from lightning.pytorch.strategies import ModelParallelStrategy

    from plumbing import distributed
    from plumbing.errors import InputError

    for variable in ("SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    cfg = tiny_cfg("trainer=ddp_cpu")
    with pytest.raises(InputError, match="local multirun"):
        distributed.start(cfg.trainer, multirun=True)
    with pytest.raises(InputError, match="ddp_spawn"):
        distributed.start(
            tiny_cfg("trainer=ddp_cpu", "trainer.strategy=ddp_spawn").trainer, multirun=False
        )
    with pytest.raises(InputError, match="num_nodes=2"):
        distributed.start(
            tiny_cfg("trainer=ddp_cpu", "trainer.num_nodes=2").trainer, multirun=False
        )
    assert not torch.distributed.is_initialized()
    assert distributed.requested(tiny_cfg("trainer=fsdp", "trainer.num_nodes=3").trainer) == (2, 3)
    strategy = distributed.lightning_strategy(tiny_cfg("trainer=fsdp_cpu").trainer)
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 1)
    distributed.start(tiny_cfg().trainer, multirun=True)  # one process: nothing to start
    assert not torch.distributed.is_initialized()


# --- Booster --------------------------------------------------------------------------------------
def build_booster():
    from helpers.alignment_baselines import booster_setup

    module, dm = booster_setup(formatter(), n_defender=4, harmful_batch_size=2, batch_size=2)
    return module, dm


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_booster_step(strategy, tmp_path):
    """‖H‖ from the all-reduced (DDP) or all-shard (FSDP2) gradient: the step of one process."""
    from helpers.alignment_baselines import independent_booster_update

    ranks = fit_two_processes(build_booster, strategy, tmp_path)
    module, dm = build_booster()
    fmt, model = dm.formatter, module.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    align_batch = dm.collate_batch([dm.encoded()[i] for i in global_indices(ranks, "user")])
    harmful_batch = collate(
        [
            fmt.encode(fmt.prompt(dm.defender_pairs[i].prompt), dm.defender_pairs[i].answer)
            for i in global_indices(ranks, "harmful")
        ],
        pad_id=fmt.tokenizer.pad_token_id,
    )
    check_update(ranks, before, independent_booster_update(model, align_batch, harmful_batch))


# --- Vaccine --------------------------------------------------------------------------------------
def build_vaccine():
    from helpers.alignment_baselines import vaccine_setup

    return vaccine_setup(formatter(), batch_size=2)


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_vaccine_step(strategy, tmp_path):
    """The hidden-state norm summed over both processes: each process's ε is its slice of one
    process's ε, and the update is one process's on the global batch."""
    from helpers.alignment_baselines import independent_vaccine_update

    ranks = fit_two_processes(build_vaccine, strategy, tmp_path)
    module, dm = build_vaccine()
    model = module.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = dm.collate_batch([dm.encoded()[i] for i in global_indices(ranks, "user")])
    expected, _, _, _ = independent_vaccine_update(model, batch, 0.5)
    check_update(ranks, before, expected)


# --- T-Vaccine ------------------------------------------------------------------------------------
def build_t_vaccine():
    from helpers.alignment_baselines import t_vaccine_setup

    return t_vaccine_setup(formatter(), batch_size=2, n_defender=2, active_layers=1)


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_t_vaccine_step(strategy, tmp_path):
    """Both processes draw the same layer (probe norms averaged over processes, a seeded draw);
    the step is Vaccine's on that layer over the global batch, the other layer unchanged."""
    from helpers.alignment_baselines import independent_vaccine_update

    ranks = fit_two_processes(
        build_t_vaccine, strategy, tmp_path, attrs=("active", "probabilities")
    )
    assert ranks[0]["active"] == ranks[1]["active"]
    assert torch.equal(ranks[0]["probabilities"], ranks[1]["probabilities"])
    (chosen,) = ranks[0]["active"]
    module, dm = build_t_vaccine()
    model = module.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = dm.collate_batch([dm.encoded()[i] for i in global_indices(ranks, "user")])
    expected, _, _, _ = independent_vaccine_update(model, batch, 0.5, layers=[chosen])
    expected = {
        n: g if f"layers.{chosen}." in n else torch.zeros_like(g) for n, g in expected.items()
    }
    check_update(ranks, before, expected)


# --- Lisa -----------------------------------------------------------------------------------------
def build_lisa():
    from helpers.lisa import datamodule, lisa

    fmt = formatter()
    return lisa(rho=0.5, k1=1, k2=1, lr=1.0), datamodule(fmt, batch_size=2)


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lisa_alignment_step(strategy, tmp_path):
    """Step 0 is an alignment step: each process trains on its shard of one global alignment batch
    (the user batches are discarded); the update is one process's on the union."""
    ranks = fit_two_processes(build_lisa, strategy, tmp_path)
    module, dm = build_lisa()
    model = module.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    items = dm.alignment_dataloader(2).dataset
    indices = ranks[0]["alignment"][0] + ranks[1]["alignment"][0]
    assert len(set(indices)) == 4
    batch = dm.collate_batch([items[i] for i in indices])
    names = list(before)
    loss = answer_loss(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
        batch["labels"],
    )
    grads = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names])
    check_update(ranks, before, dict(zip(names, grads)))


# --- LDIFS ----------------------------------------------------------------------------------------
def build_ldifs():
    from helpers.ldifs import ldifs_setup

    return ldifs_setup(formatter(), batch_size=2, drop_above=None)


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ldifs_step(strategy, tmp_path):
    """The feature distance of the global batch: each process's term scaled by the process count."""
    from helpers.ldifs import independent_ldifs_grad

    ranks = fit_two_processes(build_ldifs, strategy, tmp_path)
    module, dm = build_ldifs()
    model = module.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = dm.collate_batch([dm.encoded()[i] for i in global_indices(ranks, "user")])
    check_update(ranks, before, independent_ldifs_grad(model, batch, 0.5))
