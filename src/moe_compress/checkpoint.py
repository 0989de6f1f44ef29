"""save_compressed / load_compressed: compressed models as Hugging Face folders.

A compressed folder is a Hugging Face model folder whose config.json names its own model type (folder_config.py) and
carries a `quantization_config` that the moe_compress quantizer (quantizer.py) loads, so that
`AutoModelForCausalLM.from_pretrained(folder)` returns the compressed model, with no trust_remote_code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from moe_compress.experts import describe_form
from moe_compress.folder_config import mark_compressed
from moe_compress.quantizer import QUANT_METHOD, SharedCoreConfig
from moe_compress.testbed import TESTBEDS, resolve_bundled


def attach_quantization_config(model: nn.Module, modules: dict[str, dict], compression: Any, report: Any) -> None:
    """Record the compression in model.config, so that save_pretrained writes a folder from_pretrained can load."""
    stats = {k: v for k, v in report.to_dict().items() if k not in ("config", "rows")}
    model.config.quantization_config = SharedCoreConfig(modules, compression.to_dict(), stats)
    mark_compressed(model.config)


def compression_of(model: nn.Module) -> SharedCoreConfig:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, dict) and config.get("quant_method") == QUANT_METHOD:
        return SharedCoreConfig(**config)
    if not isinstance(config, SharedCoreConfig):
        raise ValueError("this model is not compressed by moe-compress; call moe_compress.compress(model, config) first")
    return config


def _config_in(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


def check_output_dir(path: str | os.PathLike, model_config: Any, compression: dict, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that holds anything but this same compression of this model."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder; choose another output_dir")
    if overwrite or not path.exists() or not any(path.iterdir()):
        return
    existing = _config_in(path) or {}
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


def source_tokenizer(source: str | os.PathLike):
    """The tokenizer saved with a model, or None where there is none."""
    if not str(source):
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def load_tokenizer(name_or_path: str | os.PathLike, fix: str) -> Any:
    """The tokenizer of a model folder, hub id or bundled testbed; one line naming the folder and `fix` if none."""
    source = resolve_bundled(name_or_path)
    if Path(source).is_dir() and not any((Path(source) / name).exists() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{name_or_path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); {fix}")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"cannot load the tokenizer of {name_or_path} ({str(error).splitlines()[0]}); "
                                f"{fix}") from error


def model_family(name_or_path: str | os.PathLike) -> tuple[str, int | None]:
    """(model_type, vocabulary size), read from the config alone: what a compressed model, its checkpoints and its
    teacher share."""
    config = AutoConfig.from_pretrained(resolve_bundled(name_or_path))
    return config.model_type, getattr(config.get_text_config(), "vocab_size", None)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


@contextmanager
def staged_folder(path: Path) -> Iterator[Path]:
    """A folder to write into that appears at `path` complete or not at all: it is written beside the target and
    renamed into place when the block ends without error, and removed when it does not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield staging
        _replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
        f"| relative reconstruction error | {stats.get('rel_error', float('nan')):.4f} |",
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
    model card, and the compression report when given. The folder appears complete or not at all: it is written
    beside the target and renamed into place."""
    compression = compression_of(model)
    path = Path(path)
    check_output_dir(path, model.config, compression.compression, overwrite)
    with staged_folder(path) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer = tokenizer if tokenizer is not None else source_tokenizer(getattr(model, "name_or_path", ""))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(model_card(model))
        if report is not None:
            (staging / "compression_report.json").write_text(report.to_json())
    return path


def _replace(staging: Path, path: Path) -> None:
    if not path.exists():
        staging.rename(path)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    path.rename(retired / "folder")
    staging.rename(path)
    shutil.rmtree(retired, ignore_errors=True)


def load_model(name_or_path: str, dtype: str = "auto", trust_remote_code: bool = False, **kwargs: Any) -> nn.Module:
    """A causal LM from a local folder, a hub id, or a bundled testbed's name ("testbed", "testbed_fine"), with a
    one-line error when none of them exists."""
    name_or_path = resolve_bundled(name_or_path)
    if name_or_path.startswith(("/", ".", "~")) and not Path(name_or_path).expanduser().is_dir():
        raise FileNotFoundError(f"no model folder at {name_or_path}; check the path, or pass a hub id")
    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as error:
        raise FileNotFoundError(
            f"cannot load model {name_or_path!r}: it is no local model folder, and the Hugging Face Hub does not "
            f"serve it here ({str(error).splitlines()[0]}); pass an existing folder or a valid hub id"
        ) from error


def load_compressed(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a folder written by save_compressed (kwargs go to from_pretrained: dtype, device_map, ...)."""
    check_compressed(path)
    return load_model(str(path), **kwargs)


def check_compressed(path: str | os.PathLike) -> None:
    """Refuse, from its config alone, a local folder that moe-compress did not write."""
    folder = Path(path)
    if folder.is_dir():
        config = _config_in(folder)
        if config is None:
            raise FileNotFoundError(f"{folder} has no readable config.json; pass a folder written by save_compressed")
        if (config.get("quantization_config") or {}).get("quant_method") != QUANT_METHOD:
            raise ValueError(
                f"{folder} holds a model that moe-compress did not compress; load it with "
                "AutoModelForCausalLM.from_pretrained, or compress it first"
            )


def local_model_folder(name_or_path: str) -> str:
    """A local folder holding the model: the testbed's, the given folder, or the Hub snapshot of its weights and
    configs (downloaded once into the Hugging Face cache)."""
    if name_or_path in TESTBEDS:
        return resolve_bundled(name_or_path)
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if name_or_path.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"no model folder at {name_or_path}; check the path, or pass a hub id")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                               "*.tiktoken"])
    except Exception as error:  # the hub client raises many kinds; the user needs the one line
        raise FileNotFoundError(f"cannot fetch model {name_or_path!r} from the Hugging Face Hub "
                                f"({str(error).splitlines()[0]}); pass a local folder or a valid hub id") from error
