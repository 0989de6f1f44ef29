"""Training text packed into fixed-length sequences: the testbed's corpus, local text files, or any `datasets` source
(streamed, e.g. HuggingFaceFW/fineweb-edu), each with a held-out split for the evaluation loss."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from torch.utils.data import Dataset, IterableDataset

from moe_compress.testbed import TESTBEDS, read_split


@dataclass(frozen=True)
class DataConfig:
    source: str = "testbed"  # testbed (or testbed_fine: the same corpus) | a .txt file or folder of them | a datasets id
    subset: Optional[str] = None  # datasets config name, e.g. sample-10BT
    split: str = "train"
    text_column: str = "text"
    streaming: bool = True  # datasets sources only
    seq_len: int = 256
    eval_fraction: float = 0.1  # local text: the last fraction is held out
    eval_documents: int = 200  # datasets sources: the first documents are held out

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction} must be in (0, 1)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class PackedBlocks(Dataset):
    """Token ids cut into blocks of seq_len; each item is a causal-LM example (labels = input_ids)."""

    def __init__(self, ids: list[int], seq_len: int, what: str):
        n = len(ids) // seq_len
        if n == 0:
            raise ValueError(f"{what} holds {len(ids)} tokens, fewer than one sequence of {seq_len}; "
                             "give more text or a smaller seq_len")
        self.blocks = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class PackedStream(IterableDataset):
    """Documents tokenized on the fly, joined by eos, cut into blocks of seq_len."""

    def __init__(self, documents: Iterable[str], tokenizer, seq_len: int):
        self.documents, self.tokenizer, self.seq_len = documents, tokenizer, seq_len

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        buffer: list[int] = []
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        for text in self.documents:
            buffer += self.tokenizer(text)["input_ids"] + eos
            while len(buffer) >= self.seq_len:
                block = torch.tensor(buffer[: self.seq_len])
                buffer = buffer[self.seq_len:]
                yield {"input_ids": block, "labels": block}


def _local_text(path: Path) -> str:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path} holds no .txt files; point data.source at text files or a datasets id")
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


def _split_text(text: str, eval_fraction: float) -> tuple[str, str]:
    cut = text.rfind("\n", 0, int(len(text) * (1 - eval_fraction))) + 1 or int(len(text) * (1 - eval_fraction))
    return text[:cut], text[cut:]


def _documents(config: DataConfig) -> Iterable[str]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(config.source, config.subset, split=config.split, streaming=config.streaming)
    except Exception as error:  # datasets raises many kinds; the user needs the one line
        raise ValueError(f"cannot open dataset {config.source!r}: {str(error).splitlines()[0]}; "
                         "pass a datasets id you can reach, a local .txt file or folder, or testbed") from error
    return (row[config.text_column] for row in dataset)


def calibration_sequences(config: DataConfig, tokenizer, count: int) -> torch.Tensor:
    """`count` sequences of config.seq_len token ids [count, seq_len] from the training part of a source: spread evenly
    over a local text, the first ones of a streamed dataset."""
    if _is_local(config):
        return _spread_windows(_local_splits(config)[0], tokenizer, count, config.seq_len, config.source)
    train, _ = build_datasets(config, tokenizer)
    blocks = [item["input_ids"] for item in itertools.islice(train, count)]
    if len(blocks) < count:
        raise ValueError(f"{config.source} ran out after {len(blocks)} sequences of {config.seq_len} tokens; ask "
                         "for fewer sequences or shorter ones")
    return torch.stack(blocks)


def _spread_windows(text: str, tokenizer, count: int, seq_len: int, source: str) -> torch.Tensor:
    """`count` windows of seq_len token ids [count, seq_len] starting at evenly spread places of `text`, each from
    the tokens of a stretch of text beginning at a line or word boundary there. Only the stretches are tokenized: the
    whole training text of the testbed took 1.8 s, as long as the data-free compression of a testbed, and a large
    folder of text would take hours."""
    chars, windows, end = 4 * seq_len, [], 0  # a stretch of text doubles until it holds more than seq_len tokens
    for place in torch.linspace(0, len(text), count + 1)[:-1].long().tolist():
        start = max(place, end)
        start = min((i for i in (text.find(" ", start, start + chars), text.find("\n", start, start + chars))
                     if i >= 0), default=start)
        while True:
            ids = tokenizer(text[start:start + chars], add_special_tokens=False)["input_ids"]
            if len(ids) > seq_len or start + chars >= len(text):
                break
            chars *= 2
        if len(ids) <= seq_len:  # the last token of a stretch may be a part of one: it is never taken
            raise ValueError(f"{source} holds fewer than {count} sequences of {seq_len} tokens apart from one "
                             "another; ask for fewer sequences, shorter ones, or more text")
        windows.append(ids[:seq_len])
        end = start + len(tokenizer.decode(ids[:seq_len]))  # the next window starts after this one's text
    return torch.tensor(windows, dtype=torch.long)


def _is_local(config: DataConfig) -> bool:
    return config.source in TESTBEDS or Path(config.source).exists()


def _local_splits(config: DataConfig) -> tuple[str, str]:
    """(training, held-out) text of a local source."""
    if config.source in TESTBEDS:  # both testbeds train on the same corpus
        return read_split("train"), read_split("validation")
    return _split_text(_local_text(Path(config.source)), config.eval_fraction)


def build_datasets(config: DataConfig, tokenizer) -> tuple[Dataset, Dataset]:
    """(train, held-out) datasets of packed causal-LM blocks."""
    if _is_local(config):
        train_text, eval_text = _local_splits(config)
    else:
        held_out = list(itertools.islice(_documents(config), config.eval_documents))
        encode = lambda texts: [i for t in texts for i in tokenizer(t)["input_ids"] + [tokenizer.eos_token_id or 0]]
        evaluation = PackedBlocks(encode(held_out), config.seq_len, f"the first {len(held_out)} documents")
        train = PackedStream(itertools.islice(_documents(config), config.eval_documents, None), tokenizer,
                             config.seq_len)
        return train, evaluation
    encode = lambda text: tokenizer(text)["input_ids"]
    return (PackedBlocks(encode(train_text), config.seq_len, f"the training text of {config.source}"),
            PackedBlocks(encode(eval_text), config.seq_len, f"the held-out text of {config.source}"))
