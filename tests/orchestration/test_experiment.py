"""A run's experiment (orchestration/experiment.py): what its alignment key covers."""


def test_alignment_key_covers_the_alignment_texts(tiny_cfg, tmp_path, monkeypatch):
    from orchestration.experiment import Experiment

    key = Experiment(tiny_cfg(), tmp_path).align_key()
    assert Experiment(tiny_cfg("harmful_ratio=0.7", "finetune.n=10"), tmp_path).align_key() == key
    monkeypatch.setattr("orchestration.experiment.REFUSALS", ["I refuse."])
    assert Experiment(tiny_cfg(), tmp_path).align_key() != key
