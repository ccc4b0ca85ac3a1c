"""The error every layer raises for bad user input."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (config, data files, sizes): reported as one message, naming the problem
    and its fix, before any expensive work."""
