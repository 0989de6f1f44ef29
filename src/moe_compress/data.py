"""Training text packed into fixed-length sequences, from wherever it is kept: the testbed's corpus, local text files,
local parquet, json, csv or arrow files, a `save_to_disk` folder, or a Hub dataset (streamed, e.g.
HuggingFaceFW/fineweb-edu), each with a held-out split for the evaluation loss."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from torch.utils.data import Dataset, IterableDataset

from moe_compress.testbed import TESTBEDS, read_split

FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
BUILDERS = {*FORMATS.values(), "text"}  # datasets builder names: as a source they read the current directory
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes beside a Dataset or a DatasetDict


@dataclass(frozen=True)
class DataConfig:
    """Where the training text is and how it is packed into causal-LM blocks of seq_len tokens.

    `source` is one of:
      - testbed (or testbed_fine: the same corpus), held out: its validation split;
      - a text file (.txt, or any file not of the formats below) or a folder of .txt files, read as one text, held
        out: its last eval_fraction, cut at a line;
      - a folder written by `save_to_disk`, read by `datasets.load_from_disk` (`split` picks one of a DatasetDict);
      - a parquet, json/jsonl, csv or arrow file, or a folder of them (e.g. from `huggingface-cli download`), read by
        `datasets`' own loaders with `subset`, `split` and `data_files`;
      - otherwise a Hub dataset id, read the same way.
    `data_files` (globs) picks files inside a local folder (.txt ones too) or a Hub dataset's repository. A `datasets`
    source (the last three) is a list of documents in `text_column`, each tokenized and ended by eos. Streamed
    (`streaming`), its first eval_documents are held out and the rest pass through a shuffle buffer of shuffle_buffer
    documents seeded by `seed`, so that a rerun, or a resumed run, sees the same order; read whole, its last
    eval_fraction of documents is held out, as for local text, and Trainer shuffles the blocks.
    """

    source: Optional[str] = "testbed"  # null: no data (what calibration settings hold when data-free)
    subset: Optional[str] = None  # datasets config name, e.g. sample-10BT
    split: str = "train"
    text_column: str = "text"
    streaming: bool = True  # datasets sources only: false reads and tokenizes all of it up front
    seq_len: int = 256
    eval_fraction: float = 0.1  # local text, and datasets sources read whole: the last fraction is held out
    eval_documents: int = 200  # streamed datasets sources: the first documents are held out
    data_files: Optional[list[str]] = None  # globs, e.g. [sample/10BT/*.parquet]; null: every file
    shuffle_buffer: int = 10_000  # streamed: documents shuffled at a time (0: in file order, shards in sequence)
    seed: int = 0  # of the shuffle buffer

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction} must be in (0, 1)")
        if isinstance(self.data_files, str):  # one glob, as datasets takes it; Hydra gives a list
            object.__setattr__(self, "data_files", [self.data_files])
        if self.data_files is not None and not self.data_files:
            raise ValueError("data_files is empty; give globs inside data.source's folder, e.g. ['*.parquet'], "
                             "or null for all its files")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={self.shuffle_buffer} must be >= 0 (0 keeps the files' order)")

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
    """Documents tokenized on the fly, joined by eos, cut into blocks of seq_len. `documents` is iterated afresh
    for each pass (an epoch, a resumed run), so it must be a collection or a `datasets` column, not a generator."""

    def __init__(self, documents: Iterable[str], tokenizer, seq_len: int):
        self.documents, self.tokenizer, self.seq_len = documents, tokenizer, seq_len

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        buffer: list[int] = []
        for text in self.documents:
            buffer += document_ids(text, self.tokenizer)
            while len(buffer) >= self.seq_len:
                block = torch.tensor(buffer[: self.seq_len])
                buffer = buffer[self.seq_len:]
                yield {"input_ids": block, "labels": block}


def document_ids(text: str, tokenizer) -> list[int]:
    """A document's token ids, ended by eos when the tokenizer has one, so that packed documents stay apart."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return tokenizer(text)["input_ids"] + eos


def _packed_documents(texts: Iterable[str], tokenizer, seq_len: int, what: str) -> PackedBlocks:
    return PackedBlocks([i for text in texts for i in document_ids(text, tokenizer)], seq_len, what)


def _split_text(text: str, eval_fraction: float) -> tuple[str, str]:
    cut = text.rfind("\n", 0, int(len(text) * (1 - eval_fraction))) + 1 or int(len(text) * (1 - eval_fraction))
    return text[:cut], text[cut:]


def _form(config: DataConfig) -> tuple[str, list[Path]]:
    """How `source` is read (testbed, text, saved, file: one data file, datasets: a folder of them or a Hub id) and
    its local files, found before anything is read."""
    if config.source is None:
        raise ValueError("data.source is null: there is no data to read; set data.source to the testbed, a local "
                         "folder or files, or a datasets id")
    if config.source in TESTBEDS:
        return "testbed", []
    path = Path(config.source).expanduser()
    if not path.exists():
        if config.source in BUILDERS:
            raise ValueError(f"data.source={config.source!r} is a datasets builder, which reads every file of the "
                             "current directory; give the folder (or file) of data as data.source, and data_files "
                             "to pick files in it")
        return "datasets", []
    if path.is_file():
        if config.data_files is not None:
            raise ValueError(f"data_files picks files inside a folder and data.source {path} is a file; give its "
                             "folder as data.source or drop data_files")
        return ("file" if path.suffix in FORMATS else "text"), [path]
    if any((path / marker).exists() for marker in SAVED_MARKERS):
        return "saved", [path]
    files = sorted({f for pattern in config.data_files or ["**/*"] for f in path.glob(pattern) if f.is_file()})
    if any(f.suffix in FORMATS for f in files):
        return "datasets", files
    if texts := [f for f in files if f.suffix == ".txt"]:
        return "text", texts
    picked = f" matching data_files {config.data_files}" if config.data_files else ""
    raise ValueError(f"{path} holds no .txt, parquet, json, jsonl, csv or arrow files{picked}; point data.source at "
                     "them, at a save_to_disk folder, or at a datasets id")


def _local_splits(config: DataConfig, form: str, files: list[Path]) -> tuple[str, str]:
    """(training, held-out) text of the testbed or of local text files."""
    if form == "testbed":  # both testbeds train on the same corpus
        print(f"data: the {config.source} corpus, its validation split held out")
        return read_split("train"), read_split("validation")
    print(f"data: text files ({len(files)}) from {config.source}, the last {config.eval_fraction:.0%} held out")
    text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    return _split_text(text, config.eval_fraction)


def _open(config: DataConfig, form: str, files: list[Path]) -> Any:
    """The source's `split` as a datasets Dataset, or an IterableDataset when streamed; prints the form it took."""
    import datasets

    try:
        if form == "saved":
            dataset, what = datasets.load_from_disk(str(files[0])), f"save_to_disk folder {config.source}"
        else:
            builder, what = _builder(config, form, files)
            if config.streaming:
                dataset = builder.as_streaming_dataset(split=config.split)
            else:
                builder.download_and_prepare()
                dataset = builder.as_dataset(split=config.split)
    except Exception as error:  # datasets raises many kinds; the user needs the one line
        raise ValueError(f"cannot open {config.source!r} (split {config.split!r}): {str(error).splitlines()[0]}; "
                         "pass a datasets id you can reach, a local data file or folder, or testbed") from error
    if isinstance(dataset, datasets.DatasetDict):
        if config.split not in dataset:
            raise ValueError(f"{config.source} holds the splits {list(dataset)}, not {config.split!r}; set "
                             "data.split to one of them")
        dataset = dataset[config.split]
    if config.streaming and isinstance(dataset, datasets.Dataset):  # a save_to_disk folder
        dataset = dataset.to_iterable_dataset()
    print(f"data: {what}, {'streamed' if config.streaming else 'read whole'}")
    return dataset


def _builder(config: DataConfig, form: str, files: list[Path]) -> tuple[Any, str]:
    """datasets' builder of a local data file, a folder of them or a Hub id, and what it reads, in words."""
    from datasets import load_dataset_builder

    if form == "file":
        builder = load_dataset_builder(FORMATS[files[0].suffix], data_files=str(files[0]))
    else:
        builder = load_dataset_builder(config.source, config.subset, data_files=config.data_files)
    read = (builder.config.data_files or {}).get(config.split, [])
    hub, subset = "" if files else "the Hub dataset ", f" ({config.subset})" if config.subset else ""
    return builder, f"{builder.name} files ({len(read)}) from {hub}{config.source}{subset}"


def _texts(dataset: Any, config: DataConfig) -> Any:
    """The text column, re-iterable; a missing column fails naming those there are."""
    columns = dataset.column_names
    if columns is None:  # a stream whose files carry no schema (json) learns its columns from the first row
        columns = list(next(iter(dataset), {}))
    if config.text_column not in columns:
        raise ValueError(f"{config.source} has no column {config.text_column!r}; its columns are {columns}: set "
                         "data.text_column to the one holding the text")
    return dataset[config.text_column]


def _document_splits(config: DataConfig, tokenizer, dataset: Any) -> tuple[Dataset, Dataset]:
    """(train, held-out) packed blocks of a datasets source: streamed, the first documents held out and the rest
    shuffled by a seeded buffer; read whole, the last fraction held out."""
    texts = _texts(dataset, config)
    if config.streaming:
        held_out = list(itertools.islice(texts, config.eval_documents))
        rest = dataset.skip(config.eval_documents)  # skip keeps the shards' order, so held-out stays held out
        if config.shuffle_buffer:
            rest = rest.shuffle(seed=config.seed, buffer_size=config.shuffle_buffer)
        return (PackedStream(rest[config.text_column], tokenizer, config.seq_len),
                _packed_documents(held_out, tokenizer, config.seq_len, f"the first {len(held_out)} documents"))
    cut = int(len(dataset) * (1 - config.eval_fraction))
    return (_packed_documents(texts[:cut], tokenizer, config.seq_len, f"the first {cut} documents"),
            _packed_documents(texts[cut:], tokenizer, config.seq_len, f"the last {len(dataset) - cut} documents"))


def build_datasets(config: DataConfig, tokenizer) -> tuple[Dataset, Dataset]:
    """(train, held-out) datasets of packed causal-LM blocks."""
    form, files = _form(config)
    if form in ("testbed", "text"):
        train_text, eval_text = _local_splits(config, form, files)
        encode = lambda text: tokenizer(text)["input_ids"]
        return (PackedBlocks(encode(train_text), config.seq_len, f"the training text of {config.source}"),
                PackedBlocks(encode(eval_text), config.seq_len, f"the held-out text of {config.source}"))
    return _document_splits(config, tokenizer, _open(config, form, files))


def calibration_sequences(config: DataConfig, tokenizer, count: int) -> torch.Tensor:
    """`count` sequences of config.seq_len token ids [count, seq_len] from the training part of a source: spread evenly
    over local text or a datasets source read whole, the first ones of a streamed one (after its shuffle buffer)."""
    form, files = _form(config)
    if form in ("testbed", "text"):
        return _spread_windows(_local_splits(config, form, files)[0], tokenizer, count, config.seq_len, config.source)
    train, _ = build_datasets(config, tokenizer)
    if isinstance(train, PackedBlocks):  # distinct blocks when there are enough: the spacing is then >= 1
        blocks = list(train.blocks[torch.linspace(0, len(train) - 1, count).long().unique()])
    else:
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
