"""Loading models and compressed folders: from a local folder, a hub id or a bundled testbed, with one-line errors;
their tokenizers and what a folder's config says of them, read without loading the weights."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from moe_compress.folder.quantizer import QUANT_METHOD, SharedCoreConfig
from moe_compress.testbed import TESTBEDS, resolve_bundled


def compression_of(model: nn.Module) -> SharedCoreConfig:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, dict) and config.get("quant_method") == QUANT_METHOD:
        return SharedCoreConfig(**config)
    if not isinstance(config, SharedCoreConfig):
        raise ValueError("this model is not compressed by moe-compress; call moe_compress.compress(model, config) first")
    return config


def config_in(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


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
        config = config_in(folder)
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
