"""save_compressed: a compressed model as a Hugging Face folder that from_pretrained loads.

A compressed folder is a Hugging Face model folder whose config.json names its own model type (folder/config.py) and
carries a `quantization_config` that the moe_compress quantizer (folder/quantizer.py) loads, so that
`AutoModelForCausalLM.from_pretrained(folder)` returns the compressed model, with no trust_remote_code. Every folder
is written beside its target and renamed into place: it appears complete or not at all.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from moe_compress.experts import ModuleSpec, describe_form
from moe_compress.folder.load import compression_of, config_in, source_tokenizer
from moe_compress.folder.marking import mark_compressed
from moe_compress.folder.quantizer import SharedCoreConfig


def attach_quantization_config(model: nn.Module, specs: dict[str, ModuleSpec], compression: Any, report: Any) -> None:
    """Record the compression (the spec of each experts module, the settings, the report's totals) in model.config,
    so that save_pretrained writes a folder from_pretrained can load."""
    stats = {k: v for k, v in report.to_dict().items() if k not in ("config", "rows")}
    if "reconstruction" in stats:  # the totals; each block's figures are in compression_report.json
        stats["reconstruction"] = {"block_error": stats["reconstruction"]["block_error"]}
    modules = {name: spec.to_dict() for name, spec in specs.items()}
    model.config.quantization_config = SharedCoreConfig(modules, compression.to_dict(), stats)
    mark_compressed(model.config)


def check_output_dir(path: str | os.PathLike, model_config: Any, compression: dict, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that holds anything but this same compression of this model."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder; choose another output_dir")
    if overwrite or not path.exists() or not any(path.iterdir()):
        return
    existing = config_in(path) or {}
    same = (
        existing.get("base_model_type", existing.get("model_type")) == model_config.model_type
        and existing.get("architectures") == getattr(model_config, "architectures", None)
        and (existing.get("quantization_config") or {}).get("compression") == compression
    )
    if not same:
        raise FileExistsError(
            f"{path} already holds a different model or other files; pass overwrite=True (CLI: overwrite=true) "
            "to replace it, or choose another output_dir"
        )


def model_bytes(model: nn.Module) -> int:
    """What saving `model` writes, about: its parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class NoSpaceError(OSError):
    """A write refused for lack of space (a full disk, a quota, a file size limit), said in one line: the folder, the
    space missing, and what is kept."""


OUT_OF_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                errno.EFBIG: "a file grew past this process's file size limit (ulimit -f)"}


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


@contextmanager
def no_space(folder: Path, needed: Callable[[], int], kept: Callable[[], str]) -> Iterator[None]:
    """A full disk, quota or file size limit met in the block becomes one NoSpaceError naming `folder`, the space
    missing (needed(): bytes the work still writes, against what is free now), the fix, and kept(): what the user
    keeps."""
    try:
        yield
    except Exception as error:  # noqa: BLE001  (safetensors' writer raises its own error type for the OS's)
        code = space_errno(error)
        if code is None:
            raise
        free, need = shutil.disk_usage(folder if folder.exists() else folder.parent).free, needed()
        short = (f"about {human_bytes(need - free)} more are needed ({human_bytes(need)} to write, "
                 f"{human_bytes(free)} free)" if need > free else
                 f"about {human_bytes(need)} are still to be written ({human_bytes(free)} free now)")
        fix = "raise the limit" if code == errno.EFBIG else "free space"
        raised = NoSpaceError(f"{OUT_OF_SPACE[code]} writing {folder}: {short}; {fix}, then rerun: {kept()}")
        raised.errno = code
        raise raised from None


def space_errno(error: Exception) -> int | None:
    """The errno of a write refused for lack of space, from an OSError or from safetensors' Rust writer (which says
    "I/O error: ... (os error 28)"); None for any other error."""
    if isinstance(error, NoSpaceError):
        return None
    if isinstance(error, OSError):
        code = error.errno
    else:
        found = re.search(r"\(os error (\d+)\)", str(error)) if type(error).__name__ == "SafetensorError" else None
        code = int(found[1]) if found else None
    return code if code in OUT_OF_SPACE else None


@contextmanager
def staged_folder(path: Path, model: nn.Module) -> Iterator[Path]:
    """A folder to write `model` into that appears at `path` complete or not at all: it is written beside the target
    and renamed into place when the block ends without error, and removed when it does not (a full disk then ends in
    one NoSpaceError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        with no_space(path, lambda: model_bytes(model), lambda: f"nothing was written to {path}"):
            try:
                yield staging
                replace_folder(staging, path)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)  # before the space left is measured
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(staging: Path, path: Path) -> None:
    if not path.exists():
        staging.rename(path)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    path.rename(retired / "folder")
    staging.rename(path)
    shutil.rmtree(retired, ignore_errors=True)


def weighed(settings: dict) -> str:
    """How the card names the blocks' output error: weighted as the reconstruction weighed it."""
    return " (tokens weighted by the loss's gradient)" if settings.get("reconstruction", {}).get(
        "weighting", "loss") == "loss" else ""


def model_card(model: nn.Module) -> str:
    compression = compression_of(model)
    stats, settings = compression.stats, compression.compression
    lines = [
        "---",
        "library_name: transformers",
        "tags: [moe-compress, mixture-of-experts, compressed]",
        "---",
        f"# {model.config.model_type} compressed with moe-compress",
        "",
        "Every expert projection W_e of each MoE layer is stored as "
        + describe_form(next(iter(compression.modules.values()))["form"]) + ".",
        "",
        "| | value |",
        "|---|---|",
        f"| source | {getattr(model, 'name_or_path', '') or 'in-memory model'} |",
        f"| method | {settings.get('method')} |",
        f"| expert parameters | {stats.get('params_before', 0):,} -> {stats.get('params_after', 0):,} |",
        f"| kept fraction | {stats.get('kept_fraction', float('nan')):.4f} |",
        *([f"| bits per expert weight (every stored tensor and scale) | {stats['bits_per_weight']:.3f} |"]
          if stats.get("bits_per_weight") is not None else []),
        f"| relative reconstruction error | {stats.get('rel_error', float('nan')):.4f} |",
        *([f"| MoE blocks' output error{weighed(settings)} on the last eighth of the calibration tokens, before -> "
           "after layer-wise "
           f"reconstruction | {block['before']:.4f} -> {block['after']:.4f} |"]
          if (block := stats.get("reconstruction", {}).get("block_error")) else []),
        f"| compressed experts modules | {len(compression.modules)} |",
        "",
        "With `pip install moe-compress`, load it as any model: `AutoModelForCausalLM.from_pretrained(folder)` (or",
        "`moe_compress.load_compressed(folder)`); `lm_eval --model hf --model_args pretrained=<folder>` scores it.",
        "For tools that cannot load this format, `moe-compress export <folder> <out>` writes a dense copy.",
    ]
    return "\n".join(lines) + "\n"


def save_compressed(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False,
                    max_shard_size: str | int = "5GB", report: Any = None) -> Path:
    """Write a compressed model as a Hugging Face folder: config, sharded safetensors, tokenizer, generation config,
    model card, and the compression report (compression_report.json and its plots, as compress_checkpoint writes
    them) when given. The folder appears complete or not at all: it is written beside the target and renamed into
    place."""
    compression = compression_of(model)
    path = Path(path)
    check_output_dir(path, model.config, compression.compression, overwrite)
    with staged_folder(path, model) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer = tokenizer if tokenizer is not None else source_tokenizer(getattr(model, "name_or_path", ""))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(model_card(model))
        if report is not None:
            report.save(staging)
    return path
