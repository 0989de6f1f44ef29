"""Datasets of the packaged tasks, built from files inside the package so that lm-eval never reaches the network.

lm-eval calls these through `custom_dataset: !function ...` with the task's metadata as keyword arguments.
`python -m moe_compress.tasks.tinyshakespeare` rewrites completion.jsonl from the validation text (deterministic).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from moe_compress.testbed import read_split

COMPLETION_FILE = Path(__file__).parent / "completion.jsonl"
DOCUMENT_CHARS = 2000  # a perplexity document is a run of whole speeches of at least this many characters
ITEMS, CHOICES, CONTEXT_LINES, MIN_WORDS, SEED = 200, 4, 4, 6, 0


def speeches(text: str) -> list[str]:
    """The blank-line separated paragraphs of the text: each a speaker line and what the speaker says."""
    return [s.strip("\n") for s in text.split("\n\n") if s.strip()]


def documents(**metadata: Any) -> DatasetDict:
    """The validation text cut at speech boundaries into documents of >= DOCUMENT_CHARS characters (the last may be
    shorter): rolling log-likelihood then scores every byte once, with up to the model's context of the same play."""
    docs, current = [], []
    for speech in speeches(read_split("validation")):
        current.append(speech)
        if sum(len(s) + 2 for s in current) >= DOCUMENT_CHARS:
            docs.append("\n\n".join(current))
            current = []
    docs += ["\n\n".join(current)] if current else []
    return DatasetDict({"test": Dataset.from_dict({"text": docs})})


def completion(**metadata: Any) -> DatasetDict:
    """The shipped multiple-choice items (see make_completion)."""
    rows = [json.loads(line) for line in COMPLETION_FILE.read_text(encoding="utf-8").splitlines()]
    return DatasetDict({"test": Dataset.from_list(rows)})


def _rest(line: str, words: int) -> str:
    """What follows the first `words` words of a line, with its leading space."""
    return " " + " ".join(line.split(" ")[words:])


def make_completion(text: str, items: int = ITEMS, seed: int = SEED) -> list[dict]:
    """Items {context, choices, label}. A line of >= MIN_WORDS words is cut after a random word: the context is its
    speech's speaker line, up to CONTEXT_LINES lines before it and its start; the choices are its true rest and the
    rests of CHOICES - 1 lines of other speeches (cut the same way), in random order.

    The testbed scores acc_norm 0.395 (chance 0.25) but acc 0.235, since the summed log-likelihood of plain acc
    favours short rests. Choosing a whole next line instead left even acc_norm near chance (0.31): the end of a line
    follows from its start far more than a line from the one before."""
    rng = random.Random(seed)
    all_speeches = [s.splitlines() for s in speeches(text)]
    long_lines = [(i, j) for i, lines in enumerate(all_speeches) for j in range(1, len(lines))
                  if len(lines[j].split(" ")) >= MIN_WORDS]
    cut = lambda line: rng.randrange(2, len(line.split(" ")) - 2)
    rows = []
    for i, j in rng.sample(long_lines, items):
        lines = all_speeches[i]
        words = cut(lines[j])
        answer = _rest(lines[j], words)
        others = [all_speeches[a][b] for a, b in rng.sample(long_lines, 2 * CHOICES) if a != i]
        choices = [answer, *(_rest(line, cut(line)) for line in others[: CHOICES - 1])]
        rng.shuffle(choices)
        context = [lines[0], *lines[max(1, j - CONTEXT_LINES):j], " ".join(lines[j].split(" ")[:words])]
        rows.append({"context": "\n".join(context), "choices": choices, "label": choices.index(answer)})
    return rows


if __name__ == "__main__":
    rows = make_completion(read_split("validation"))
    COMPLETION_FILE.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} items to {COMPLETION_FILE}")
