"""The statistics store: a checkpoint's calibration statistics, one safetensors file per experts module with its
checksum in a manifest (parallel.Manifest), in a folder named by what they depend on. A crash resumes from the first
module not saved, and a compression of the same model on the same calibration tokens at another size reuses them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moe_compress.calibration.grams import ExpertGrams
from moe_compress.parallel import Manifest


def statistics_dir(output_dir: Path, source_settings: dict, calibration: dict[str, Any],
                   token_ids: torch.Tensor) -> Path:
    """Where the statistics of this model on these calibration tokens live: beside the output folder, named by what
    they depend on (the source checkpoint, the calibration settings that shape them, the tokens), not by the
    compression settings."""
    identity = json.dumps({"source": source_settings, "calibration": calibration,
                           "tokens": hashlib.sha256(token_ids.numpy().tobytes()).hexdigest()}, sort_keys=True)
    return output_dir.parent / f".moe-compress-statistics-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def save_statistics(manifest: Manifest, name: str, grams: ExpertGrams) -> None:
    manifest.save(name, grams.state(), {"tokens": int(grams.tokens.sum())})


BLOCK_DATA = ("block_inputs", "block_outputs")  # what load_block_data reads


def load_statistics(manifest: Manifest, name: str) -> ExpertGrams:
    """One module's statistics for its curves and fits: the Grams alone. The kept tokens' inputs and outputs beside
    them are the reconstruction's, which reads them itself (load_block_data): at Qwen3-30B-A3B's shape, 65,536 of
    them are 1 GiB a module, which each pass read for nothing."""
    with safe_open(manifest.path(name), "pt") as f:
        return ExpertGrams.from_state({key: f.get_tensor(key) for key in f.keys() if key not in BLOCK_DATA})


def load_token_counts(manifest: Manifest, name: str) -> list[int]:
    """The calibration tokens routed to each expert of one module, without reading its Grams."""
    with safe_open(manifest.path(name), "pt") as f:
        return f.get_tensor("tokens").tolist()


def load_block_data(manifest: Manifest, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The calibration inputs [N, H] kept with one module's statistics and their MoE block's outputs (None in a
    store saved before they were kept), without reading its Grams."""
    with safe_open(manifest.path(name), "pt") as f:
        inputs, outputs = BLOCK_DATA
        if inputs not in f.keys():
            raise ValueError(f"the statistics of {name} in {manifest.folder} keep no inputs; delete that folder to "
                             "gather them again with the reconstruction's")
        return f.get_tensor(inputs), f.get_tensor(outputs) if outputs in f.keys() else None


def sensitivity_unit(name: str) -> str:
    """The store's unit of one experts module's token weights (calibration/sensitivity.py)."""
    return f"{name}.sensitivity"


def save_sensitivity(manifest: Manifest, name: str, weights: torch.Tensor) -> None:
    manifest.save(sensitivity_unit(name), {"weights": weights}, {"tokens": len(weights)})


def load_sensitivity(manifest: Manifest, name: str) -> torch.Tensor:
    """The token weights [N] of one experts module's kept calibration tokens."""
    if not manifest.done([sensitivity_unit(name)]):
        raise ValueError(f"the statistics in {manifest.folder} keep no token weights for {name}; delete that folder "
                         "to gather them again with the loss-weighted reconstruction's")
    return load_file(manifest.path(sensitivity_unit(name)))["weights"]
