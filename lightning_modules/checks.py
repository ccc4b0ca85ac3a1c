"""Checks of a defense part's hyperparameters. A module's `hyperparameter_problems(values)` returns
one message per bad value; config validation calls it before the model loads (every problem of a
config reported at once) and the module's constructor calls it again (raise_problems)."""

from __future__ import annotations

from plumbing.errors import InputError


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def nonnegative_problems(values: dict, keys: tuple[str, ...]) -> list[str]:
    """`key=value must be a number >= 0` for each of `keys` that is not."""
    return [
        f"{k}={values[k]!r} must be a number >= 0"
        for k in keys
        if k in values and (not is_number(values[k]) or values[k] < 0)
    ]


def count_problems(values: dict, keys: tuple[str, ...]) -> list[str]:
    """`key=value must be an integer >= 0` for each of `keys` that is not (a count of steps or
    samples: 0.5 would pass a number check and break a modulo or a slice)."""
    return [
        f"{k}={values[k]!r} must be an integer >= 0"
        for k in keys
        if k in values and (not is_integer(values[k]) or values[k] < 0)
    ]


def batch_size_problems(values: dict, key: str = "harmful_batch_size") -> list[str]:
    """`key=value must be an integer >= 1` if it is not (a batch size, or any other size >= 1)."""
    v = values.get(key, 1)
    if not is_integer(v) or v < 1:
        return [f"{key}={v!r} must be an integer >= 1"]
    return []


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise InputError("; ".join(problems))
