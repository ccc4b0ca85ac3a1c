"""The command line the reports share: a sweep directory, where to write, the interval level."""

from __future__ import annotations

import argparse
from pathlib import Path

from evaluation.statistics import DEFAULT_LEVEL


def report_parser(doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write (default: the sweep directory)"
    )
    parser.add_argument(
        "--level", type=float, default=DEFAULT_LEVEL, help="interval level, in (0, 1)"
    )
    return parser
