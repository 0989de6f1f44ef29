"""export_dense(folder, output_dir): a compressed folder written back as a plain Hugging Face model folder.

For the tools that cannot load the compressed format (GGUF converters, serving engines without our plugin): every
expert W_e is rebuilt densely from the cores and factors, so any transformers loads the result with no package, and
its logits are the compressed model's. It stores as much as the original model: the memory saving is given back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from moe_compress.experts import SharedCoreExperts
from moe_compress.folder.load import folder_bytes, load_compressed, source_tokenizer
from moe_compress.folder.marking import unmark_compressed
from moe_compress.folder.save import staged_folder


def export_dense(folder: str | os.PathLike, output_dir: str | os.PathLike, dtype: str = "auto",
                 overwrite: bool = False, max_shard_size: str | int = "5GB") -> Path:
    """Write `folder` (a compressed folder) to `output_dir` with dense experts; `dtype` "auto" keeps the folder's.

    The experts are rebuilt in fp32 and only then cast, so the dense weights carry no more rounding than storing them
    in `dtype` must. The folder appears complete or not at all.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty; pass overwrite=True (CLI: overwrite=true) or another "
                              "output_dir")
    model = load_compressed(folder, dtype=torch.float32)  # checks that it is a compressed folder
    stored = json.loads((Path(folder) / "config.json").read_text()).get("dtype") or "float32"
    target = getattr(torch, stored if dtype == "auto" else dtype.removeprefix("torch."))
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, SharedCoreExperts):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module.to_dense())
    unmark_compressed(model)
    model.to(target)
    with staged_folder(output_dir, model) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer = source_tokenizer(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return output_dir


def size_note(folder: str | os.PathLike, output_dir: str | os.PathLike) -> str:
    """One line for the user: where the export went, and the memory it gives back."""
    before, after = folder_bytes(Path(folder)), folder_bytes(Path(output_dir))
    return (f"dense export written to {output_dir}: {after / 2**20:,.1f} MiB, against {before / 2**20:,.1f} MiB "
            f"compressed ({after / before:.1f}x): every expert is rebuilt densely, so this gives back the memory "
            "saving; use it only for tools that cannot load the compressed folder")
