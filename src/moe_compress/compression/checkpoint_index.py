"""The source checkpoint folder, indexed without loading the model: its config, its model on the meta device, which
shard holds each tensor, and where each experts module's tensors are, read one module at a time.

Expert tensors are read straight from the shards through transformers' own checkpoint conversion, so that both
on-disk layouts work: per-expert 2-D tensors such as `experts.7.gate_proj.weight` or `experts.7.w1.weight`, and fused
3-D tensors. Shapes: E experts, out x in a projection's matrices.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

from moe_compress.discovery import find_experts
from moe_compress.folder.quantizer import QUANT_METHOD


@dataclass
class Source:
    """How one parameter of an experts module is stored: on-disk tensor names, in transformers' loading order, and
    the conversion transformers applies to them (None when the parameter is stored as is, under its own name)."""

    keys: list[str] = dataclasses.field(default_factory=list)
    patterns: list[str] = dataclasses.field(default_factory=list)
    converter: WeightConverter | None = None


@dataclass
class ExpertsOnDisk:
    name: str  # the module's name in the model, e.g. model.layers.0.mlp.experts
    module: nn.Module  # the meta-device module: its flags and shapes
    sources: dict[str, Source]  # parameter name -> where it is on disk
    saved_as: str  # the prefix its compressed tensors are written under, in the checkpoint's own spelling


@dataclass
class SourceCheckpoint:
    """A safetensors checkpoint folder, as far as compressing it needs: its config, its meta-device model, which
    shard holds each tensor, and where each experts module's tensors are."""

    folder: Path
    config: PretrainedConfig
    model: nn.Module
    files: dict[str, str]  # tensor name -> shard file name
    experts: list[ExpertsOnDisk]
    stored_as: dict[str, str] = dataclasses.field(default_factory=dict)  # model name -> on-disk name, for the tensors
    # outside the experts that are stored as they are (renamed at most)

    @property
    def other_keys(self) -> list[str]:
        """The tensors that are copied through unchanged."""
        expert_keys = {k for e in self.experts for s in e.sources.values() for k in s.keys}
        return [k for k in self.files if k not in expert_keys]

    def path(self, key: str) -> Path:
        return self.folder / self.files[key]


@contextmanager
def reading() -> Iterator[Callable[[Path, str], torch.Tensor]]:
    """read(file, name) -> tensor, for the block's duration. safetensors files are memory-mapped and the pages read
    stay resident while a file is open: opening files per block keeps memory to what the block reads."""
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(path: Path, key: str) -> torch.Tensor:
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, "pt"))
            return handles[path].get_tensor(key)

        yield read


def can_stream(path: str | Path) -> bool:
    """Whether compress_checkpoint reads `path`: a local model folder with safetensors weights."""
    folder = Path(path)
    weights = (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()
    return (folder / "config.json").exists() and weights


def _weight_files(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    if (folder / "model.safetensors").exists():
        with safe_open(folder / "model.safetensors", "pt") as f:
            return dict.fromkeys(f.keys(), "model.safetensors")
    raise FileNotFoundError(
        f"{folder} holds no safetensors weights (model.safetensors or model.safetensors.index.json); streaming reads "
        "safetensors only: convert the checkpoint, or compress the loaded model with moe_compress.compress"
    )


def _meta_model(folder: Path, trust_remote_code: bool) -> tuple[PretrainedConfig, nn.Module]:
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no model folder at {folder} (no config.json); pass a Hugging Face model folder")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
        if method == QUANT_METHOD:
            raise ValueError(f"{folder} is already compressed by moe-compress; compress the original model instead")
        raise ValueError(f"{folder} is quantized ({method}); compress an unquantized checkpoint (bf16, fp16 or fp32)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return config, model


def open_checkpoint(folder: str | Path, trust_remote_code: bool = False) -> SourceCheckpoint:
    """Map every experts module of the model in `folder` to its tensors on disk, without reading any weight.

    Each checkpoint name goes through the renamings and conversions transformers applies when loading, and is an
    expert tensor when it lands on a parameter of an experts module. The renamings that applied, reversed, give the
    on-disk spelling of the compressed modules' names, as save_pretrained would write them.
    """
    folder = Path(folder)
    config, model = _meta_model(folder, trust_remote_code)
    files = _weight_files(folder)
    found = find_experts(model)
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta_state = model.state_dict()
    owner = {f"{name}.{p}": (name, p) for name, m in found for p, _ in m.named_parameters(recurse=False)}
    sources: dict[str, dict[str, Source]] = defaultdict(lambda: defaultdict(Source))
    stored_as = {}
    for key in sorted(files, key=dot_natural_key):  # transformers' order: experts 0..E-1
        renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if renamed not in meta_state and key in meta_state:
            renamed, pattern = key, None
        if pattern is None and renamed in meta_state and renamed not in owner:
            stored_as[renamed] = key
        if renamed in owner:
            name, param = owner[renamed]
            source = sources[name][param]
            source.keys.append(key)
            source.patterns.append(pattern)
            source.converter = by_pattern[pattern] if pattern is not None else None
    reverse = [r.reverse_transform() for r in renamings[::-1] if r.was_used()]
    experts = []
    for name, module in found:
        missing = [p for p, _ in module.named_parameters(recurse=False) if p not in sources[name]]
        if missing:
            raise ValueError(f"{folder} has no tensors for {name}.{missing[0]}; the checkpoint is incomplete")
        saved_as = rename_source_key(name, reverse, [], reverse=True)[0]
        experts.append(ExpertsOnDisk(name, module, dict(sources[name]), saved_as))
    return SourceCheckpoint(folder, config, model, files, experts, stored_as)


def _read_param(read: Callable[[str], torch.Tensor], target: str, source: Source, model: nn.Module) -> torch.Tensor:
    if source.converter is None:
        return read(source.keys[0])
    converter = copy.deepcopy(source.converter)  # it collects tensors: one fresh copy per parameter
    for key, pattern in zip(source.keys, source.patterns):
        converter.add_tensor(target, key, pattern, lambda key=key: read(key))
    value = converter.convert(target, model=model, config=model.config)[target]
    return value[0] if isinstance(value, list) else value


def read_experts(checkpoint: SourceCheckpoint, experts: ExpertsOnDisk, params: set[str]) -> nn.Module:
    """A stand-in for the experts module holding the named parameters read from disk in its own layout (the others
    stay on the meta device), so that discovery.split_weights reads it like a loaded model's."""
    module = copy.copy(experts.module)
    module._parameters = dict(module._parameters)
    with reading() as read:
        for param in params:
            value = _read_param(lambda key: read(checkpoint.path(key), key), f"{experts.name}.{param}",
                                experts.sources[param], checkpoint.model)
            module._parameters[param] = nn.Parameter(value, requires_grad=False)
    return module


def params_of(module: nn.Module, projections: list[str]) -> set[str]:
    """The module parameters that hold `projections`: gate and up share gate_up_proj; biases come along."""
    names = {"gate_up_proj" if module.has_gate and p != "down" else f"{p}_proj" for p in projections}
    return names | {f"{n}_bias" for n in names if module.has_bias}


def block_name(experts: ExpertsOnDisk) -> str:
    """The MoE block that calls the experts module: its parent."""
    return experts.name.rpartition(".")[0]


def read_block(checkpoint: SourceCheckpoint, experts: ExpertsOnDisk) -> tuple[nn.Module, nn.Module]:
    """The MoE block holding `experts` read from disk, on the CPU: (block, its experts module's stand-in with every
    parameter read). The block's other tensors (router, shared experts) must be stored as they are in the model."""
    name = block_name(experts)
    original = read_experts(checkpoint, experts, {p for p, _ in experts.module.named_parameters(recurse=False)})
    block = copy.deepcopy(checkpoint.model.get_submodule(name)).to_empty(device="cpu")
    slot = next(child for child, module in checkpoint.model.get_submodule(name).named_children()
                if module is experts.module)
    setattr(block, slot, original)
    state = {}
    with reading() as read:
        for key in block.state_dict():
            if key.startswith(f"{slot}."):
                continue
            full = f"{name}.{key}"
            if full not in checkpoint.stored_as:
                raise ValueError(f"{checkpoint.folder} stores {full} in a converted layout; the layer-wise "
                                 "reconstruction of a checkpoint folder reads the MoE block's other tensors as they "
                                 "are: set compression.reconstruction.steps=0, or compress the loaded model")
            disk = checkpoint.stored_as[full]
            state[key] = read(checkpoint.path(disk), disk)
    block.load_state_dict(state, strict=False)
    return block, original
