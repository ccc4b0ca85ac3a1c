"""A run's experiment (orchestration/experiment.py): what its alignment key covers."""


def test_alignment_key_covers_the_alignment_texts(tiny_cfg, tmp_path, monkeypatch):
    from orchestration.experiment import Experiment

    key = Experiment(tiny_cfg(), tmp_path).align_key()
    assert Experiment(tiny_cfg("harmful_ratio=0.7", "finetune.n=10"), tmp_path).align_key() == key
    monkeypatch.setattr("orchestration.experiment.REFUSALS", ["I refuse."])
    assert Experiment(tiny_cfg(), tmp_path).align_key() != key


def test_a_probe_is_in_the_key_of_the_stage_it_watches_only(tiny_cfg, tmp_path):
    """The safety probe observes the training: it is part of the watched stage's key (its output
    is stored there), but a probe of the alignment leaves the aligned adapter, and so the
    fine-tuning's key, as they are. The diagnostics callback, which is not an observer, is in
    no key."""
    from orchestration.experiment import Experiment

    def keys(*overrides):
        exp = Experiment(tiny_cfg(*overrides), tmp_path)
        return exp.align_key(), exp.finetune_key()

    plain = keys()
    assert keys("callbacks.diagnostics=null") == plain
    on_align = keys("callbacks=safety_probe", "callbacks.safety_probe.stages=[align]")
    assert on_align[0] != plain[0] and on_align[1] == plain[1]
    on_finetune = keys("callbacks=safety_probe")
    assert on_finetune[0] == plain[0] and on_finetune[1] != plain[1]
    judged = keys("callbacks=safety_probe", "judge=keyword")  # the probe's HS uses the judge
    assert judged[1] != on_finetune[1] and keys("judge=keyword") == plain


def test_new_adapter_merges_the_aligned_one_and_starts_fresh(tiny_cfg, tmp_path):
    """finetune.adapter=new: the model's outputs are unchanged by the merge (the fresh adapter's B
    is zero), only the fresh adapter is trainable, and an FSDP-style rebuild (load_model) gives
    the same merged model again."""
    import torch

    from orchestration.experiment import Experiment
    from plumbing.models import trainable

    exp = Experiment(tiny_cfg(), tmp_path)
    exp.load_model()
    with torch.no_grad():
        for name, p in trainable(exp.model).items():  # an "aligned" adapter that changes outputs
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    aligned_logits = exp.model(input_ids=ids).logits
    aligned_state = {n: p.detach().clone() for n, p in trainable(exp.model).items()}

    exp.new_adapter(seed=7)
    fresh = trainable(exp.model)
    assert fresh.keys() == aligned_state.keys()
    assert all(p.abs().sum() == 0 for n, p in fresh.items() if "lora_B" in n)
    assert not torch.equal(
        fresh[next(n for n in fresh if "lora_A" in n)],
        aligned_state[next(n for n in aligned_state if "lora_A" in n)],
    )
    torch.testing.assert_close(
        exp.model(input_ids=ids).logits, aligned_logits, rtol=1e-5, atol=1e-5
    )
    frozen = sum(p.numel() for p in exp.model.parameters() if not p.requires_grad)

    with torch.no_grad():  # train the fresh adapter a little, then rebuild as FSDP's unshard does
        for name, p in fresh.items():
            p.add_(0.01)
    trained = {n: p.detach().clone() for n, p in fresh.items()}
    logits = exp.model(input_ids=ids).logits
    exp.load_model()
    with torch.no_grad():
        for name, p in trainable(exp.model).items():
            p.copy_(trained[name])
    torch.testing.assert_close(exp.model(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in exp.model.parameters() if not p.requires_grad) == frozen
