"""What a training run's output_dir holds, as the Trainer and distill() write it and the watcher reads it: checkpoint-N
folders, complete once their trainer_state.json names step N, and the end marker distill() writes last."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

END_MARKER = "training_complete.json"
CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def complete_checkpoints(run_dir: str | os.PathLike) -> dict[int, Path]:
    """The checkpoint-N folders the Trainer has finished writing, by ascending step.

    Trainer._save_checkpoint writes the folder in place (weights, then optimizer, scheduler and RNG state) and
    trainer_state.json last, so a folder is complete once that file parses and names step N."""
    found = {}
    for folder in Path(run_dir).iterdir():
        match = CHECKPOINT.match(folder.name)
        if match and trainer_state_step(folder) == int(match[1]):
            found[int(match[1])] = folder
    return dict(sorted(found.items()))


def trainer_state_step(folder: Path) -> int | None:
    try:
        return json.loads((folder / TRAINER_STATE_NAME).read_text())["global_step"]
    except (OSError, ValueError, KeyError):  # absent, or still being written
        return None
