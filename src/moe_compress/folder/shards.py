"""Safetensors shards written from bytes already on disk: a compressed folder is assembled from the source's
untouched tensors and the finished units' files without decoding any tensor, and memory holds one copy buffer
whatever the sizes (safetensors' own writers take every tensor in memory at once)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from transformers.core_model_loading import dot_natural_key

# Bytes per element of safetensors dtypes: a file lists its tensors widest first, so that each starts at a multiple of
# its element size (safetensors' own writer does the same); the rest are 1 byte wide or narrower.
ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
COPY_BUFFER = 64 << 20


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor's bytes lie in a safetensors file, and what they hold."""

    path: Path
    start: int  # offset of its first byte in the file
    size: int
    dtype: str
    shape: list[int]


def stored_tensors(path: Path) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file, from its header (8-byte little-endian length, then JSON); no data read."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    found = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        found[name] = StoredTensor(path, 8 + length + begin, end - begin, info["dtype"], info["shape"])
    return found


def _copy_bytes(tensor: StoredTensor, out: BinaryIO) -> None:
    with open(tensor.path, "rb") as src:
        src.seek(tensor.start)
        left = tensor.size
        while left:
            chunk = src.read(min(left, COPY_BUFFER))
            if not chunk:
                raise OSError(f"{tensor.path} ends inside one of its tensors; the file is truncated")
            out.write(chunk)
            left -= len(chunk)


def write_safetensors(tensors: dict[str, StoredTensor], path: Path) -> None:
    """A safetensors file of `tensors`, their bytes copied from where they lie: nothing is decoded, and memory holds
    one copy buffer whatever the sizes (safetensors' own writers take every tensor in memory at once)."""
    order = sorted(tensors, key=lambda name: (-ITEMSIZE.get(tensors[name].dtype, 1), name))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        header[name] = {"dtype": tensors[name].dtype, "shape": tensors[name].shape,
                        "data_offsets": [offset, offset + tensors[name].size]}
        offset += tensors[name].size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little") + encoded)
        for name in order:
            _copy_bytes(tensors[name], out)


def _shards(sizes: dict[str, int], max_shard_size: int) -> list[list[str]]:
    """Tensor names in natural order, cut into shards of at most `max_shard_size` bytes (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for key in sorted(sizes, key=dot_natural_key):
        if shards[-1] and filled + sizes[key] > max_shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(key)
        filled += sizes[key]
    return shards


def write_weights(tensors: dict[str, StoredTensor], folder: Path, max_shard_size: int) -> None:
    """`tensors` as Hugging Face shards in `folder`: model.safetensors, or numbered shards and their index."""
    shards = _shards({name: t.size for name, t in tensors.items()}, max_shard_size)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        write_safetensors({key: tensors[key] for key in keys}, folder / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.size for t in tensors.values())},
                 "weight_map": {key: name for name, keys in zip(names, shards) for key in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
