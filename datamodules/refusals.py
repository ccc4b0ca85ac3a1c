"""Refusal texts written by this project: 10 openings x 10 reasons = 100 generic refusals.

Alignment pairs each harmful prompt with one of them; Antibody cycles through them as the
generic refusal y_r. The openings are phrased the way aligned chat models refuse, so the
refusal judge (evaluation/judges.py) recognises them without being tuned to this list alone.
"""

OPENINGS = [
    "I'm sorry, but I can't help with that.",
    "I cannot help with this request.",
    "I can't assist with that.",
    "Sorry, I won't provide that.",
    "I'm not able to help with this.",
    "I must decline this request.",
    "I apologize, but I cannot do that.",
    "I'm sorry, I can't provide this information.",
    "I won't help with that request.",
    "I cannot provide assistance with this.",
]

REASONS = [
    "It could cause serious harm to people.",
    "Helping with this could put others in danger.",
    "This request asks for something harmful or illegal.",
    "Providing this would be unsafe and irresponsible.",
    "It goes against my commitment to keeping people safe.",
    "This could be used to hurt someone.",
    "I don't assist with activities that can cause harm.",
    "Sharing this kind of content could lead to real damage.",
    "This falls outside what I can responsibly help with.",
    "Doing so could violate laws and harm others.",
]

REFUSALS = [f"{o} {r}" for r in REASONS for o in OPENINGS]


def refusal_for(index: int) -> str:
    """The index-th refusal, cycling through all 100."""
    return REFUSALS[index % len(REFUSALS)]
