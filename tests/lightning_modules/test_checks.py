"""The shared hyperparameter checks: which values pass, and the message each bad one gets."""

from lightning_modules.checks import batch_size_problems, count_problems, integer_problems


def test_integer_problems_names_each_bad_value_with_its_bound():
    values = {"a": 0, "b": 1.5, "c": True, "d": -1, "e": 3, "f": None}
    assert integer_problems(values, least=1) == [
        "a=0 must be an integer >= 1",
        "b=1.5 must be an integer >= 1",
        "c=True must be an integer >= 1",
        "d=-1 must be an integer >= 1",
        "f=None must be an integer >= 1",
    ]


def test_optional_lets_an_unset_value_pass_but_not_a_bad_one():
    assert integer_problems({"seed": None, "split": -2}, optional=True) == [
        "split=-2 must be an integer >= 0"
    ]


def test_count_and_batch_size_checks_keep_their_messages():
    assert count_problems({"steps": 0.5, "other": -1}, ("steps", "absent")) == [
        "steps=0.5 must be an integer >= 0"
    ]
    assert batch_size_problems({}) == []
    assert batch_size_problems({"harmful_batch_size": 0}) == [
        "harmful_batch_size=0 must be an integer >= 1"
    ]
