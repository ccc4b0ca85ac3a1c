"""The harmful data of one experiment, split into disjoint roles by construction.

- `user_pairs`: the pool the user's poisoned set draws its harmful (prompt, answer) samples from;
- `defender_pairs`: harmful pairs held by the defender (Panacea's h, Antibody's harmful batch);
- `align_prompts`: harmful prompts the alignment stage pairs with refusals;
- `eval_prompts`: held-out harmful prompts for the harmful score.

Pairs and prompts are deduplicated on a normalized form of the prompt; every normalized prompt
gets exactly one role, and prompt-only sources lose any prompt that also appears among the pairs.
The split depends on `split_seed` only, never on the run's training seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from datamodules.sources import HarmfulPair, read_harmful_pairs, read_prompts
from pipeline.validation import InputError


def normalize(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", prompt.lower()).strip()


@dataclass
class HarmfulSplits:
    user_pairs: list[HarmfulPair]
    defender_pairs: list[HarmfulPair]
    align_prompts: list[str]
    eval_prompts: list[str]
    pairs_source: str

    def roles(self) -> dict[str, set[str]]:
        """Normalized prompts per role (what the disjointness test checks)."""
        return {
            "user": {normalize(p.prompt) for p in self.user_pairs},
            "defender": {normalize(p.prompt) for p in self.defender_pairs},
            "align": {normalize(p) for p in self.align_prompts},
            "eval": {normalize(p) for p in self.eval_prompts},
        }


def _unique(items, key):
    seen, out = set(), []
    for item in items:
        k = key(item)
        if k and k not in seen:
            seen.add(k)
            out.append(item)
    return out


def build_harmful_splits(
    harmful_pairs: str,
    prompt_sources: list[dict],
    n_defender: int,
    n_align: int,
    n_eval: int,
    split_seed: int = 0,
) -> HarmfulSplits:
    """Read the sources and partition them; raises InputError when a role cannot be filled."""
    pairs = _unique(read_harmful_pairs(harmful_pairs), key=lambda p: normalize(p.prompt))
    pair_keys = {normalize(p.prompt) for p in pairs}
    prompts = [p for source in prompt_sources for p in read_prompts(source)]
    prompts = _unique(prompts, key=normalize)
    prompts = [p for p in prompts if normalize(p) not in pair_keys]

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
    if problems:
        raise InputError("; ".join(problems))

    rng = random.Random(split_seed)
    rng.shuffle(pairs)
    rng.shuffle(prompts)
    return HarmfulSplits(
        user_pairs=pairs[n_defender:],
        defender_pairs=pairs[:n_defender],
        eval_prompts=prompts[:n_eval],
        align_prompts=prompts[n_eval:n_eval + n_align],
        pairs_source=harmful_pairs,
    )
