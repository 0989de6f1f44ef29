"""lm-eval tasks that ship with moe-compress and run offline: YAML task configs over the testbed's held-out text.

    tinyshakespeare            bits per byte, byte and word perplexity (rolling log-likelihood) of the validation text
    tinyshakespeare_completion complete a line: its true rest among four (multiple choice, 200 items)

`moe_compress.evaluate` hands this folder to lm-eval's TaskManager (include_path), so these names work beside every
lm-eval task. Each YAML says how its task is built; tinyshakespeare.py builds their datasets.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
