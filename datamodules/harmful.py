"""The harmful data of one experiment, split into disjoint roles by construction.

- `user_pairs`: the pool the user's poisoned set draws its harmful (prompt, answer) samples from;
- `defender_pairs`: harmful pairs held by the defender (Panacea's h, Antibody's harmful batch);
- `align_prompts`: harmful prompts the alignment stage pairs with refusals;
- `eval_prompts`: held-out harmful prompts for the harmful score, each with its source name
  (`eval_sources`, for HS per source): `n_eval` of the prompt sources, `n_eval_remainder` more of
  what the prompt sources leave after alignment, and `n` of each held-out-only source
  (`heldout_sources`, files never used in a training role);
- `validation_prompts`: the prompt sources' prompts in no role above, for tuning a hyperparameter
  on prompts the test set does not contain (`+eval.datamodule.split=validation`).

Pairs and prompts are deduplicated on a normalized form of the prompt; every normalized prompt
gets exactly one role, and prompt-only sources lose any prompt that also appears among the pairs.
The split depends on `split_seed` only, never on the run's training seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from datamodules.sources import HarmfulPair, read_harmful_pairs, read_prompts
from plumbing.errors import InputError


def normalize(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", prompt.lower()).strip()


@dataclass
class HarmfulSplits:
    user_pairs: list[HarmfulPair]
    defender_pairs: list[HarmfulPair]
    align_prompts: list[str]
    eval_prompts: list[str]
    pairs_source: str
    # the safe answer of each alignment prompt where the data has one (BeaverTails' is_safe
    # responses); None: the alignment stage pairs each prompt with one of the project's refusals
    align_answers: list[str] | None = None
    eval_sources: list[str] | None = None  # the source name of each eval prompt
    validation_prompts: list[str] = field(default_factory=list)  # none: no validation split

    def __post_init__(self):
        if self.eval_sources is None:
            self.eval_sources = ["eval"] * len(self.eval_prompts)

    def roles(self) -> dict[str, set[str]]:
        """Normalized prompts per role (what the disjointness test checks)."""
        return {
            "user": {normalize(p.prompt) for p in self.user_pairs},
            "defender": {normalize(p.prompt) for p in self.defender_pairs},
            "align": {normalize(p) for p in self.align_prompts},
            "eval": {normalize(p) for p in self.eval_prompts},
            "validation": {normalize(p) for p in self.validation_prompts},
        }


def _unique(items, key):
    seen, out = set(), []
    for item in items:
        k = key(item)
        if k and k not in seen:
            seen.add(k)
            out.append(item)
    return out


def source_name(source: dict) -> str:
    """A prompt source's name in per-source results: its `name`, else its file's stem."""
    return source.get("name") or Path(source["path"]).stem


def build_harmful_splits(
    harmful_pairs: str,
    prompt_sources: list[dict],
    n_defender: int,
    n_align: int,
    n_eval: int,
    split_seed: int = 0,
    n_eval_remainder: int = 0,
    heldout_sources: list[dict] = (),
) -> HarmfulSplits:
    """Read the sources and partition them; raises InputError when a role cannot be filled.

    The prompt sources are split first (eval, then alignment, then the rest), so adding held-out
    prompts (`n_eval_remainder`, `heldout_sources`) leaves the alignment prompts as they were;
    what the held-out remainder leaves of the rest is the validation split."""
    pairs = _unique(read_harmful_pairs(harmful_pairs), key=lambda p: normalize(p.prompt))
    pair_keys = {normalize(p.prompt) for p in pairs}
    prompts = [(p, source_name(s)) for s in prompt_sources for p in read_prompts(s)]
    prompts = _unique(prompts, key=lambda item: normalize(item[0]))
    prompts = [item for item in prompts if normalize(item[0]) not in pair_keys]

    problems = []
    if n_defender < 0 or n_defender >= len(pairs):
        problems.append(
            f"data.n_defender={n_defender} must be in [0, {len(pairs) - 1}]: {harmful_pairs} has "
            f"{len(pairs)} distinct harmful pairs and the user's pool needs at least one"
        )
    if n_eval < 1 or n_align < 1 or n_eval + n_align > len(prompts):
        problems.append(
            f"data.n_eval={n_eval} + data.n_align={n_align} must be >= 1 each and at most "
            f"{len(prompts)}, the distinct harmful prompts in data.prompt_sources "
            "(after removing those that also appear among the harmful pairs)"
        )
    elif not 0 <= n_eval_remainder <= len(prompts) - n_eval - n_align:
        problems.append(
            f"data.n_eval_remainder={n_eval_remainder} must be in [0, {len(prompts) - n_eval - n_align}]: "
            "the prompts data.prompt_sources have left after data.n_eval and data.n_align"
        )
    if problems:
        raise InputError("; ".join(problems))

    rng = random.Random(split_seed)
    rng.shuffle(pairs)
    rng.shuffle(prompts)
    rest = prompts[n_eval + n_align :]
    held_out = prompts[:n_eval] + rest[:n_eval_remainder]
    held_out += heldout_only(heldout_sources, {normalize(p) for p, _ in prompts} | pair_keys, rng)
    return HarmfulSplits(
        user_pairs=pairs[n_defender:],
        defender_pairs=pairs[:n_defender],
        eval_prompts=[p for p, _ in held_out],
        eval_sources=[name for _, name in held_out],
        align_prompts=[p for p, _ in prompts[n_eval : n_eval + n_align]],
        pairs_source=harmful_pairs,
        validation_prompts=[p for p, _ in rest[n_eval_remainder:]],
    )


def heldout_only(sources: list[dict], taken: set[str], rng: random.Random) -> list[tuple[str, str]]:
    """`n` seeded prompts of each held-out-only source, none of them in `taken` (every prompt of
    the pairs and of the prompt sources, whatever their role) nor in an earlier held-out source."""
    chosen, problems = [], []
    for source in sources:
        name = source_name(source)
        fresh = _unique(
            [p for p in read_prompts(source) if normalize(p) not in taken], key=normalize
        )
        if not 0 <= source["n"] <= len(fresh):
            problems.append(
                f"data.heldout_sources: {name} n={source['n']} must be in [0, {len(fresh)}], its distinct "
                "prompts that are in no other role"
            )
            continue
        rng.shuffle(fresh)
        chosen += [(p, name) for p in fresh[: source["n"]]]
        taken |= {normalize(p) for p in fresh[: source["n"]]}
    if problems:
        raise InputError("; ".join(problems))
    return chosen


def splits_from_config(data: dict) -> HarmfulSplits:
    """The splits a `data=` config describes: its `splits_builder` (a dotted function taking the
    data config), else the harmful-pairs file + prompt files of build_harmful_splits."""
    builder = data.get("splits_builder")
    if builder:
        from hydra.utils import get_method

        return get_method(builder)(data)
    return build_harmful_splits(
        data["harmful_pairs"],
        data["prompt_sources"],
        data["n_defender"],
        data["n_align"],
        data["n_eval"],
        data["split_seed"],
        data.get("n_eval_remainder", 0),
        data.get("heldout_sources") or [],
    )


BEAVERTAILS_COLUMNS = ("prompt", "response", "category", "is_safe")


def beavertails_splits(data: dict) -> HarmfulSplits:
    """BeaverTails (PKU-Alignment/BeaverTails) split as the papers use it, with disjoint prompts:
    - eval_prompts: `n_eval` prompts of the test split whose response is unsafe, or, with
      `eval_hub_name` (Antibody's protocol: PKU-Alignment/BeaverTails-Evaluation), the first
      `n_eval` distinct prompts of that set in its order, each with its category as its source;
    - defender_pairs / user_pairs: unsafe (prompt, response) pairs of the train split, one per
      prompt: `n_defender` for the defender, the rest the user's harmful pool;
    - align_prompts + align_answers: `n_align` safe (prompt, response) pairs of the train split
      (is_safe true), whose prompts have no unsafe pair in it.
    A prompt (normalized) gets exactly one role; the eval prompts are removed from the train pools."""
    from datamodules.hub import load_rows

    train = load_rows(
        data["hub_name"], data["train_split"], data.get("train_path"), columns=BEAVERTAILS_COLUMNS
    )
    n_align, n_defender, n_eval = data["n_align"], data["n_defender"], data["n_eval"]

    def unsafe(rows):
        return _unique([r for r in rows if not r["is_safe"]], key=lambda r: normalize(r["prompt"]))

    rng = random.Random(data["split_seed"])
    if data.get("eval_hub_name"):
        eval_rows, eval_where = evaluation_set_rows(data)
    else:
        test = load_rows(
            data["hub_name"], data["test_split"], data.get("test_path"), columns=BEAVERTAILS_COLUMNS
        )
        eval_rows, eval_where = unsafe(test), data["test_split"]
        rng.shuffle(eval_rows)
    eval_keys = {normalize(r["prompt"]) for r in eval_rows[:n_eval]}
    harmful = [r for r in unsafe(train) if normalize(r["prompt"]) not in eval_keys]
    harmful_keys = {normalize(r["prompt"]) for r in harmful}
    safe = _unique(
        [
            r
            for r in train
            if r["is_safe"] and normalize(r["prompt"]) not in harmful_keys | eval_keys
        ],
        key=lambda r: normalize(r["prompt"]),
    )

    problems = []
    if not 1 <= n_eval <= len(eval_rows):
        problems.append(
            f"data.n_eval={n_eval} must be in [1, {len(eval_rows)}]: the distinct unsafe prompts of "
            f"{eval_where}"
        )
    if not 0 <= n_defender < len(harmful):
        problems.append(
            f"data.n_defender={n_defender} must be in [0, {len(harmful) - 1}]: the distinct unsafe "
            f"pairs of {data['train_split']} (the user's pool needs at least one)"
        )
    if not 1 <= n_align <= len(safe):
        problems.append(
            f"data.n_align={n_align} must be in [1, {len(safe)}]: the distinct safe pairs of "
            f"{data['train_split']} whose prompt has no unsafe pair (a larger split, e.g. 330k_train, has more)"
        )
    if problems:
        raise InputError("; ".join(problems))
    rng.shuffle(harmful)
    rng.shuffle(safe)
    pairs = [HarmfulPair(r["prompt"], r["response"]) for r in harmful]
    return HarmfulSplits(
        user_pairs=pairs[n_defender:],
        defender_pairs=pairs[:n_defender],
        align_prompts=[r["prompt"] for r in safe[:n_align]],
        align_answers=[r["response"] for r in safe[:n_align]],
        eval_prompts=[r["prompt"] for r in eval_rows[:n_eval]],
        eval_sources=[r.get("source", f"beavertails_{data['test_split']}") for r in eval_rows][
            :n_eval
        ],
        pairs_source=f"{data['hub_name']} [{data['train_split']}]",
    )


def evaluation_set_rows(data: dict) -> tuple[list[dict], str]:
    """The distinct prompts of an evaluation set of harmful prompts (columns prompt, category), in
    its order, each with `source` = its category; and where they came from, for messages."""
    from datamodules.hub import load_rows

    name, split = data["eval_hub_name"], data.get("eval_split", "test")
    rows = load_rows(name, split, data.get("eval_path"), columns=("prompt", "category"))
    prefix = name.split("/")[-1].lower().replace("-", "_")
    rows = [{**r, "source": f"{prefix}_{r['category']}"} for r in rows]
    return _unique(rows, key=lambda r: normalize(r["prompt"])), f"{name} [{split}]"
