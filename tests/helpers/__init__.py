"""Helpers shared by several test files (not fixtures: those are in tests/conftest.py).

`tests` is on pytest's `pythonpath`, so every test file imports them as `helpers.<module>`."""
