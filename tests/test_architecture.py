"""The import rule of the layout (README, "Layout"): every project import points down or sideways.

    run.py                      top: the command
    orchestration/              stages, stage cache, validation, tracking, sweeps and their report
    datamodules/ lightning_modules/ evaluation/ callbacks/      the domain: import each other freely
    plumbing/                   errors, io, distributed, models and adapters, generation, figures

A module may import its own layer and the layers below it, never one above (lazy imports inside
functions count too).
"""

import ast
from pathlib import Path

from helpers.configs import ROOT

LAYERS = {
    "plumbing": 0,
    "datamodules": 1,
    "lightning_modules": 1,
    "evaluation": 1,
    "callbacks": 1,
    "orchestration": 2,
    "run": 3,
    "hydra_plugins": 3,  # hydra/sweeper=optuna: beside run.py, as Hydra requires of plugins
}


def project_imports(path: Path) -> set[str]:
    """The top-level project packages a module imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(LAYERS)


def layered_modules() -> list[tuple[str, Path]]:
    files = [("run", ROOT / "run.py")]
    for package in LAYERS:
        files += (
            [(package, f) for f in sorted((ROOT / package).rglob("*.py"))]
            if (ROOT / package).is_dir()
            else []
        )
    return files


def test_every_package_of_the_rule_exists():
    assert all((ROOT / p).is_dir() for p in LAYERS if p != "run")
    assert not list((ROOT / "pipeline").glob("*.py"))  # the old catch-all is gone


def test_imports_point_down_or_sideways():
    violations = [
        f"{path.relative_to(ROOT)} ({package}, layer {LAYERS[package]}) imports {target} (layer {LAYERS[target]})"
        for package, path in layered_modules()
        for target in project_imports(path)
        if LAYERS[target] > LAYERS[package]
    ]
    assert violations == []


def test_the_rule_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from orchestration.stages import run\n")
    assert project_imports(bad) == {"orchestration"}
