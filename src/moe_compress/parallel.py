"""Parallel and resumable work: torchrun's processes split the work units, and a manifest records each finished one.

A unit is one (experts module, projection) pair. Launched by torchrun (`torchrun --nproc-per-node N ...`, several
nodes the way torchrun always does it), every process takes a contiguous share of the units left to do, fits them on
the GPU of its LOCAL_RANK (on the CPU, with the gloo backend, when there is none) and writes each one as it finishes;
rank 0 assembles after a barrier. Outside torchrun the same code runs as a single rank. On several nodes the output
folder must be on a file system they all share: rank 0 assembles what every rank wrote.

Every finished unit is a small safetensors file written atomically (temporary file, fsync, rename), then a line in its
rank's manifest with the file's sha256. A rerun keeps the units whose file matches a recorded checksum and refits the
rest, so a run killed at any point ends, when rerun, with the result of an uninterrupted one. The work folder records
the run's settings; a rerun with other settings is refused unless told to overwrite.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import save

# Ranks wait at the final barrier while the slowest one fits its share, which takes hours on a large model; the
# default timeouts (10 minutes for nccl) would kill a healthy run.
BARRIER_TIMEOUT = timedelta(hours=48)
SETTINGS = "settings.json"


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among torchrun's: its global rank, their number, its index on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def label(self, desc: str) -> str:
        """A progress bar's name, with this process's rank when there are several: "calibration [rank 1/2]"."""
        return desc if self.world_size == 1 else f"{desc} [rank {self.rank}/{self.world_size}]"


def current_ranks() -> Ranks:
    """This process's place among torchrun's (rank 0 of 1 outside torch.distributed)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        return Ranks(local_rank=local_rank)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)


def fit_device(requested: str | None) -> torch.device:
    """The device this process fits on: the GPU of its LOCAL_RANK (when `requested` is None or "cuda" and there is
    one), else `requested`, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested == "cuda" or (requested is None and torch.cuda.is_available()):
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f"process {local_rank} of this node has no GPU of its own ({count} found); start at most {count} "
                "processes per node (torchrun --nproc-per-node)"
            )
        return torch.device("cuda", local_rank)
    return torch.device(requested or "cpu")


@contextmanager
def distributed(device: torch.device) -> Iterator[Ranks]:
    """torch.distributed across torchrun's processes (nccl between GPUs, gloo between CPUs) for the duration of the
    block; a single rank outside torchrun, or the caller's process group when one is already up."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        yield current_ranks()
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl's object broadcasts stage through the current device
        dist.init_process_group("nccl", timeout=BARRIER_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield current_ranks()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share(units: Sequence, ranks: Ranks) -> list:
    """This rank's contiguous block of `units`: neighbouring units share a layer, so each rank reads few layers twice."""
    start = len(units) * ranks.rank // ranks.world_size
    return list(units[start: len(units) * (ranks.rank + 1) // ranks.world_size])


def write_atomically(path: Path, data: bytes) -> None:
    """`path` holds `data` or its previous content, never a part: temporary file, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: the part written is given back
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def open_work_dir(folder: Path, settings: dict, overwrite: bool) -> None:
    """Create the work folder of a run, or reuse the one a run with the same `settings` left; another run's folder is
    refused, or emptied when `overwrite`."""
    recorded = folder / SETTINGS
    if folder.exists():
        try:
            previous = json.loads(recorded.read_text())
        except (OSError, ValueError):
            previous = None
        if previous == settings:
            return
        if not overwrite:
            raise FileExistsError(
                f"{folder} holds the unfinished work of a run with other settings ({_difference(previous, settings)}); "
                "rerun with the same settings to resume it, or pass overwrite=True (CLI: overwrite=true) to start over"
            )
        shutil.rmtree(folder)
    (folder / "units").mkdir(parents=True)
    write_atomically(recorded, json.dumps(settings, indent=1, sort_keys=True).encode())


def _flat(settings: dict, prefix: str = "") -> dict[str, Any]:
    """Nested settings as {dotted key: value}, e.g. {"compression.target_ratio": 0.3}."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _difference(previous: dict | None, settings: dict) -> str:
    """The settings that differ, by dotted key: only those, not the whole dicts they sit in."""
    if not isinstance(previous, dict):
        return "unreadable settings.json"
    before, now = _flat(previous), _flat(settings)
    keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    return ", ".join(f"{k}: {before.get(k)} then, {now.get(k)} now" for k in keys)


class Manifest:
    """The finished units of a run in `folder`: `units/<unit>.safetensors`, and one JSON line per finished unit
    ({"unit", "sha256", "stats"}) in `manifest.rank<R>.jsonl`.

    Each rank appends to a file of its own, because appends from several hosts to one file are not atomic on network
    file systems. A line torn by a crash does not parse and is skipped: its unit is refitted.
    """

    def __init__(self, folder: Path, rank: int = 0):
        self.folder = folder
        self.own = folder / f"manifest.rank{rank}.jsonl"

    def path(self, unit: str) -> Path:
        return self.folder / "units" / f"{unit}.safetensors"

    def save(self, unit: str, tensors: dict[str, torch.Tensor], stats: dict) -> None:
        data = save(tensors)
        write_atomically(self.path(unit), data)
        line = json.dumps({"unit": unit, "sha256": hashlib.sha256(data).hexdigest(), "stats": stats})
        with open(self.own, "a+b") as f:
            end = f.seek(0, os.SEEK_END)
            if end and os.pread(f.fileno(), 1, end - 1) != b"\n":
                f.write(b"\n")  # a crash tore the last record: end its line, so that this one parses
            f.write(line.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> dict[str, dict[str, dict]]:
        """{unit: {sha256: stats}} from every rank's manifest."""
        found: dict[str, dict[str, dict]] = {}
        for manifest in sorted(self.folder.glob("manifest.rank*.jsonl")):
            for line in manifest.read_text().splitlines():
                try:
                    record = json.loads(line)
                    found.setdefault(record["unit"], {})[record["sha256"]] = record["stats"]
                except (ValueError, KeyError, TypeError):
                    continue
        return found

    def done(self, units: Sequence[str]) -> dict[str, dict]:
        """{unit: stats} of the `units` whose file matches a recorded checksum."""
        records = self.records()
        found = {}
        for unit in units:
            if self.path(unit).exists():
                with open(self.path(unit), "rb") as f:
                    stats = records.get(unit, {}).get(hashlib.file_digest(f, "sha256").hexdigest())
                if stats is not None:
                    found[unit] = stats
        return found
