"""Write sentences.npz: 256 English sentences tokenised for MiniLM (input_ids, attention_mask; padded to 64).

    .venv/bin/python examples/minilm/make_sentences.py

Sentences are built from a fixed grammar with a fixed seed: varied topics and lengths, so that nearest
neighbours (retrieval agreement) and padding (masks of every length) are both exercised.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

SUBJECTS = ["The old fisherman", "A young doctor", "My neighbour's cat", "The city council", "Our football team",
            "The research group", "A small startup", "The orchestra", "Her grandmother", "The night train",
            "A curious child", "The museum", "The chef", "Two hikers", "The new manager", "A stray dog"]
VERBS = ["repaired", "discussed", "painted", "ignored", "celebrated", "sold", "studied", "photographed",
         "delivered", "cancelled", "described", "cooked", "measured", "borrowed", "lost", "found"]
OBJECTS = ["the wooden boat", "a budget for next year", "the kitchen walls", "the morning news", "their first victory",
           "a protein that folds badly", "an app for farmers", "a symphony by Brahms", "a recipe for plum cake",
           "the last connection to the coast", "a jar of green marbles", "a collection of Roman coins",
           "a soup with too much salt", "the height of the old tower", "a ladder from the shed", "the keys to the van"]
TAILS = ["", "", " before the storm arrived", " while everyone else was asleep", " after a long and difficult week",
         " near the harbour", " in front of a large and noisy crowd of visitors", " without telling anyone",
         " for the second time this month", " because the deadline had been moved forward by three days"]


def sentences(n: int = 256, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}." for _ in range(n)]


def main() -> None:
    import importlib.util

    here = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("minilm_example", here / "model.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    enc = mod.tokenizer()(sentences(), padding="max_length", max_length=64, truncation=True, return_tensors="np")
    np.savez_compressed(here / "sentences.npz", input_ids=enc["input_ids"].astype(np.int64),
                        attention_mask=enc["attention_mask"].astype(np.int64))
    print(f"wrote {here / 'sentences.npz'}: {enc['input_ids'].shape}, lengths "
          f"{enc['attention_mask'].sum(1).min()}..{enc['attention_mask'].sum(1).max()}")


if __name__ == "__main__":
    main()
