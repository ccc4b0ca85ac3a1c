from plumbing.generation import generate_greedy
from plumbing.models import build_tiny


def test_batched_generation_equals_one_prompt_at_a_time(tiny_formatter):
    model, tokenizer = build_tiny(init_seed=3)
    prompts = [
        tiny_formatter.prompt(p)
        for p in [
            "Hi",
            "Write a long story about a dragon and a knight",
            "Why?",
            "Explain the water cycle",
        ]
    ]
    batched, finished = generate_greedy(
        model, tokenizer, prompts, 10, batch_size=4, with_finished=True
    )
    single = [generate_greedy(model, tokenizer, [p], 10, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert len(finished) == 4 and all(isinstance(f, bool) for f in finished)
    assert generate_greedy(model, tokenizer, [], 10, batch_size=4) == []
