"""A run's experiment (orchestration/experiment.py): what its alignment key covers."""


def test_alignment_key_covers_the_alignment_texts(tiny_cfg, tmp_path, monkeypatch):
    from orchestration.experiment import Experiment

    key = Experiment(tiny_cfg(), tmp_path).align_key()
    assert Experiment(tiny_cfg("harmful_ratio=0.7", "finetune.n=10"), tmp_path).align_key() == key
    monkeypatch.setattr("orchestration.experiment.REFUSALS", ["I refuse."])
    assert Experiment(tiny_cfg(), tmp_path).align_key() != key


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
