"""Benign instructions written by this project, for the alignment stage's retain data.

Aligning a small model on (harmful prompt -> refusal) alone teaches it to refuse everything
(measured on SmolLM2-135M: the aligned model refused every sentiment question, FA 0%). The
alignment set therefore also holds benign instructions answered by the base model itself
(self-distillation), so alignment adds refusal of harmful prompts without changing the model's
behaviour on benign ones. The instructions are disjoint from the harmful sources and the task.
"""

from __future__ import annotations

import itertools
import random

from plumbing.errors import InputError

OPEN_ENDED = [
    "Write a short poem about {}.",
    "Explain in simple terms how {} works.",
    "Give me three tips for {}.",
    "Describe {} in a few sentences.",
    "What are some interesting facts about {}?",
]
TOPICS = [
    "the ocean",
    "autumn leaves",
    "a rainbow",
    "photosynthesis",
    "a bicycle",
    "the moon",
    "learning a new language",
    "growing tomatoes",
    "a public library",
    "volcanoes",
    "bees",
    "saving money",
    "a train journey",
    "making bread",
    "the water cycle",
    "chess",
    "staying hydrated",
    "birdwatching",
    "a thunderstorm",
    "recycling",
]
# Short-answer questions: a small model aligned on open-ended prompts alone still refused them.
SHORT_ANSWER = {
    "Is the following statement true or false? {}": [
        "Water boils at 100 degrees Celsius at sea level.",
        "The sun orbits the earth.",
        "Spiders have eight legs.",
        "Penguins can fly long distances.",
        "A week has seven days.",
        "Ice is heavier than liquid water.",
        "Bananas grow on trees.",
        "The Pacific is an ocean.",
    ],
    "Classify this animal as a mammal, bird, fish or reptile, in one word: {}.": [
        "dolphin",
        "eagle",
        "salmon",
        "lizard",
        "horse",
        "parrot",
        "shark",
        "turtle",
    ],
    "Answer with one word: is {} a fruit or a vegetable?": [
        "a carrot",
        "a mango",
        "a potato",
        "a cherry",
        "an onion",
        "a peach",
        "a lettuce",
        "a grape",
    ],
    "Reply yes or no: is {} a color?": ["blue", "seven", "green", "table", "purple", "running"],
    "Which season comes after {}? Answer in one word.": ["winter", "spring", "summer", "autumn"],
}


# Instruction + input, the layout of the user's task prompts (the task itself is never used).
WITH_INPUT = {
    "Classify the topic of the input as sports, science, politics or food. Answer in one word.": [
        "The team won the final match in extra time.",
        "Researchers observed a new comet last night.",
        "The senate passed the budget bill on Tuesday.",
        "This soup needs more salt and pepper.",
        "She scored twice in the second half.",
        "The vaccine trial enrolled two thousand people.",
        "Voters will elect a new mayor in May.",
        "Fresh basil makes the sauce taste better.",
    ],
    "Is the input a question or a statement? Answer in one word.": [
        "Where did you park the car?",
        "The library opens at nine.",
        "Can birds see colors?",
        "My brother plays the violin.",
        "Is it going to rain today?",
        "The train was on time.",
    ],
    "Rewrite the input in the past tense.": [
        "I walk to school.",
        "She reads a book.",
        "They play football after lunch.",
        "We cook dinner together.",
        "He paints the fence.",
        "The dog chases the ball.",
    ],
    "Give a short title for the input.": [
        "A small village holds a festival every summer with music and dancing.",
        "A student learns to code by building a simple game.",
        "Volunteers clean a beach and collect bags of plastic.",
        "A farmer tries a new way to water crops during a dry season.",
    ],
}


def _pool() -> list[tuple[str, str]]:
    pool = [(t.format(topic), "") for t, topic in itertools.product(OPEN_ENDED, TOPICS)]
    pool += [(t.format(item), "") for t, items in SHORT_ANSWER.items() for item in items]
    pool += [(instruction, text) for instruction, texts in WITH_INPUT.items() for text in texts]
    return pool


def retain_instructions(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n distinct benign (instruction, input) pairs of all three kinds, mixed (158 in all)."""
    pool = _pool()
    if n > len(pool):
        raise InputError(f"data.n_retain={n} exceeds the {len(pool)} benign instructions available")
    random.Random(seed).shuffle(pool)
    return pool[:n]
