"""The bundled testbed: a small byte-level Qwen3-MoE trained on Tiny Shakespeare.

Random weights say nothing about compression quality, so the package ships a real trained MoE (made by
`python -m moe_compress.testbed.train`, described in `model/README.md`) and the text it was trained on.

    model, tokenizer = load_testbed()
    heldout_loss(model, read_split("validation"))   # nats per byte

The tokenizer maps byte b to token id b (vocabulary of exactly 256), so a text's token ids are its UTF-8 bytes.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

TESTBED_DIR = Path(__file__).parent / "model"
FINE_TESTBED_DIR = Path(__file__).parent / "fine"
# the names that select a bundled model wherever a model is asked for
TESTBEDS = {"testbed": TESTBED_DIR, "testbed_fine": FINE_TESTBED_DIR}
VALIDATION_FRACTION = 0.1


def resolve_bundled(name_or_path: str | Path) -> str:
    """The folder of a bundled testbed when given its name ("testbed", "testbed_fine"), else the argument as given."""
    folder = TESTBEDS.get(str(name_or_path))
    return str(folder) if folder is not None else str(name_or_path)


def load_testbed(
    dtype: torch.dtype = torch.float32, path: str | Path = TESTBED_DIR
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The shipped model (or one made by the training script at `path`) and its tokenizer, read offline."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def corpus_path() -> Path:
    """Tiny Shakespeare (public domain, 1,115,394 ASCII characters), as used by char-rnn and nanoGPT."""
    return Path(__file__).parent / "data" / "tinyshakespeare.txt"


def read_split(split: str) -> str:
    """The train or validation text: validation is the last 10% of the characters, starting at a line start.

    The cut is the first character after the last newline before 90% of the text, so no line is split between the two.
    """
    text = corpus_path().read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * (1 - VALIDATION_FRACTION))) + 1
    splits = {"train": text[:cut], "validation": text[cut:]}
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(splits)}")
    return splits[split]


@torch.inference_mode()
def heldout_loss(
    model: PreTrainedModel, text: str, seq_len: int = 256, batch_size: int = 16, max_tokens: int | None = None
) -> float:
    """Mean next-byte cross-entropy of `model` on `text`, in nats per byte.

    The text's UTF-8 bytes (= token ids of a byte-level model), cut to `max_tokens` if given, are read in
    non-overlapping windows of `seq_len` targets: window i feeds bytes [i L, (i+1) L) and scores the prediction of
    bytes [i L + 1, (i+1) L + 1), so every byte but the first is scored once, with 1 to L bytes of context.
    A last window with fewer than `seq_len` targets is dropped, so scores do not depend on a ragged tail.
    """
    ids = torch.frombuffer(bytearray(text.encode("utf-8")[:max_tokens]), dtype=torch.uint8).long()
    n_windows = (len(ids) - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"text has {len(ids)} bytes, fewer than seq_len + 1 = {seq_len + 1}; pass more text")
    inputs = ids[: n_windows * seq_len].view(n_windows, seq_len)  # [N, L]
    targets = ids[1 : n_windows * seq_len + 1].view(n_windows, seq_len)  # [N, L]
    device = next(model.parameters()).device
    total = 0.0
    was_training = model.training
    model.eval()  # routers and dropout behave as at inference, whatever state a trainer left the model in
    try:
        for x, y in zip(inputs.split(batch_size), targets.split(batch_size)):
            logits = model(input_ids=x.to(device)).logits.float()  # [B, L, V]
            total += F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
    finally:
        model.train(was_training)
    return total / targets.numel()
