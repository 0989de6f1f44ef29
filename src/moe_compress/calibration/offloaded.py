"""Calibration statistics of a checkpoint folder, gathered layer by layer without loading the model whole.

The model is loaded with its decoder layers offloaded to disk (accelerate, through transformers' device_map): the
embeddings and what follows the layers stay in memory, and each layer's weights are read for its own forward and
dropped after it. Memory stays that of one layer whatever the depth: the load reads each checkpoint tensor with its
file opened for that read alone, the heap's freed pages go back to the system after each layer, and on the CPU a bf16
checkpoint's layers run in fp32, which caches no kernel per matmul shape (compute_dtype). The calibration
batches go through the layers one at a time (layers.py), each layer on the previous layer's original outputs; the
experts' gate and up weights, which the statistics need for the intermediate activations, are read from the checkpoint
as the fits read them.

Each experts module's statistics are saved atomically, with their checksums, in a folder of their own: a crash
resumes from the first layer not saved, and a compression of the same model on the same calibration data at another
size reuses them without calibrating again.

The loss weights of the reconstruction's tokens (calibration/sensitivity.py) need a forward through every layer and a
backward; in one process the statistics pass is that forward, keeping each layer's inputs on those tokens for the
backward that follows it. Under torchrun the pass is data-parallel: every process runs its share of the batches through
the layers, and since the statistics are sums over tokens, an all-reduce after each layer gives every process the
whole; rank 0 saves them. The weights, which are of the first process's share's tokens, are then computed before the
pass, in a pass of their own shared out by batch the same way.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from moe_compress.calibration.grams import ExpertGrams
from moe_compress.calibration.layers import capture, decoder_layers, layer_statistics
from moe_compress.calibration.sensitivity import (LayerTrace, first_batches, layer_sensitivity, placed_weights,
                                                  traced_backward)
from moe_compress.calibration.store import save_sensitivity, save_statistics, sensitivity_unit
from moe_compress.discovery import split_weights
from moe_compress.parallel import Manifest, current_ranks

def _offload_map(model: nn.Module, device: str) -> dict[str, str]:
    """A device_map with the decoder layers on disk and every other module on `device`."""
    prefix, _ = decoder_layers(model)
    device_map, parts = {prefix: "disk"}, prefix.split(".")
    for depth in range(len(parts)):  # the siblings of every module on the way down to the layers
        parent, on_path = ".".join(parts[:depth]), ".".join(parts[:depth + 1])
        for name, _ in model.get_submodule(parent).named_children():
            child = f"{parent}.{name}" if parent else name
            if child != on_path:
                device_map[child] = device
    return device_map


class _ReadOnDemand:
    """A checkpoint tensor as transformers' loader takes it, read when the loader asks ([...]) with its file opened for
    that read alone. from_pretrained keeps every shard it reads memory-mapped until the whole model is loaded, and the
    pages it read stay resident until then: its peak grew by every offloaded layer's size (25 MiB a layer, 3 GiB at
    120 layers in BENCHMARKS.md §8). Opening the file per tensor costs about 0.5 ms a tensor."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key

    def __getitem__(self, index) -> torch.Tensor:
        with safe_open(self.path, "pt") as f:
            return f.get_slice(self.key)[index]

    @property
    def dtype(self) -> torch.dtype:  # read by dtype="auto" when the config names none: the first tensor, once
        return self[...].dtype

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point


def offloaded_model(checkpoint, offload_folder: Path, device: str) -> nn.Module:
    """The checkpoint's model with its decoder layers offloaded to `offload_folder` (see _ReadOnDemand); its class is
    the meta-device model's, so remote code runs only where open_checkpoint allowed it."""
    state = {key: _ReadOnDemand(checkpoint.path(key), key) for key in checkpoint.files}
    return type(checkpoint.model).from_pretrained(
        None, config=checkpoint.config, state_dict=state, device_map=_offload_map(checkpoint.model, device),
        offload_folder=offload_folder, dtype="auto").eval()


def compute_dtype(stored: torch.dtype, device: str) -> torch.dtype | None:
    """The dtype the statistics pass runs each layer in when not the checkpoint's own: fp32 for a bf16 or fp16
    checkpoint on the CPU. There, oneDNN runs bf16 matmuls and caches a kernel per shape (its primitive cache and
    ideep's, 1,024 entries each), and each layer routes each expert a new number of tokens, so new shapes keep
    coming: resident memory grew 2.3 MiB a layer at d = 1024 and 1.9 at d = 512, and stayed under the fits after the
    pass (BENCHMARKS.md §8). fp32 matmuls go to MKL's sgemm, which keeps nothing per shape: 0.02-0.04 MiB a layer,
    in 0.96x the time on a CPU without AMX. The Grams are summed in fp32 either way. On a GPU the layers run as
    stored."""
    upcast = torch.device(device).type == "cpu" and stored in (torch.bfloat16, torch.float16)
    return torch.float32 if upcast else None


def _cast_parameters(layer: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    for name, parameter in layer.named_parameters():
        parameter.data = parameter.data.to(dtypes[name])


@contextmanager
def onloaded(layer: nn.Module, dtype: torch.dtype | None = None) -> Iterator[None]:
    """The offloaded weights of `layer` read once for the block, not at every call: accelerate's hooks read each
    module's weights from disk before its forward and drop them after, once per batch (on testbed_fine 30-40% of the
    pass through the layers). With `dtype`, its floating weights are read in it and go back to their own after."""
    hooked = [m for m in layer.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
    own = {name: parameter.dtype for name, parameter in layer.named_parameters()}
    if dtype is not None:  # on the meta device until read, where casting costs nothing; the hooks read into it
        _cast_parameters(layer, {name: dtype if d.is_floating_point else d for name, d in own.items()})
    for module in hooked:
        module._hf_hook.pre_forward(module)
        module._hf_hook.offload = False
    try:
        yield
    finally:
        for module in hooked:
            module._hf_hook.offload = True
            module._hf_hook.post_forward(module, None)
        if dtype is not None:
            _cast_parameters(layer, own)


def _sum_over_ranks(stats: ExpertGrams, device: str) -> None:
    """Each process's statistics replaced by their sum over all processes."""
    for total in (stats.tokens, stats.inputs, stats.intermediate):
        on_device = total.to(device)  # nccl reduces GPU tensors only
        dist.all_reduce(on_device)
        total.copy_(on_device)


def _gather(model: nn.Module, batches: list[torch.Tensor], done: dict, on_disk: dict, read_gate_up: Callable,
            manifest: Manifest, device: str, dtype: torch.dtype | None, progress: bool, keep_inputs: int,
            weigh: bool = False, spill: Path | None = None) -> None:
    """The statistics pass of gather_statistics over this process's `batches`, for the modules not `done`. With
    `weigh` (one process alone), the pass keeps each layer's inputs on the batches that hold the first `keep_inputs`
    tokens (with `spill`, in files there) and their loss weights follow from them: the weighing's forward is this
    pass, where _weigh runs one of its own."""
    ranks = current_ranks()
    inputs, trace = capture(model, batches), LayerTrace(spill)
    weighed = first_batches(batches, keep_inputs) if weigh else []
    around = partial(onloaded, dtype=dtype)
    statistics = layer_statistics(
        model, inputs, lambda name: name not in done,
        lambda name: ExpertGrams(model.get_submodule(name), split_weights(read_gate_up(on_disk[name])),
                                 keep_inputs, device=device),
        dtype=dtype, around_layer=around, progress=progress,
        desc=ranks.label("calibration"),
        before_layer=lambda index, hidden: trace.keep(index, hidden[:len(weighed)]) if weighed else None)
    for grams in statistics:
        for name, stats in grams.items():
            if ranks.world_size > 1:
                _sum_over_ranks(stats, device)
            if ranks.is_main:
                save_statistics(manifest, name, stats)
        del grams
    if weighed:
        with tqdm(total=len(inputs.layers), desc="loss weights", unit="layer", disable=not progress) as bar:
            found = traced_backward(model, weighed, inputs, trace, dtype, around, bar)
        for name, weights in placed_weights(model, weighed, keep_inputs, found).items():
            save_sensitivity(manifest, name, weights)


def _weigh(model: nn.Module, batches: list[torch.Tensor], tokens: int, manifest: Manifest, device: str,
           dtype: torch.dtype | None, progress: bool, spill: Path) -> None:
    """The token weights of the first `tokens` tokens of `batches` (calibration/sensitivity.py), saved by the first
    process, in a pass of their own. Under torch.distributed every process computes them on its share of the batches
    and a sum over the processes puts them together: no process waits while one weighs the whole."""
    ranks = current_ranks()

    def total(weights: torch.Tensor) -> torch.Tensor:
        if ranks.world_size == 1:
            return weights
        on_device = weights.to(device)  # nccl reduces GPU tensors only
        dist.all_reduce(on_device)
        return on_device.cpu()

    found = layer_sensitivity(model, batches, tokens, dtype, partial(onloaded, dtype=dtype), progress, spill,
                              (ranks.rank, ranks.world_size), total, ranks.label("loss weights"))
    if ranks.is_main:
        for name, weights in found.items():
            save_sensitivity(manifest, name, weights)


def gather_statistics(checkpoint: Any, read_gate_up: Callable[[Any], nn.Module], batches: list[torch.Tensor],
                      folder: Path, device: str, progress: bool = True, keep_inputs: int = 0,
                      weigh: bool = False) -> Manifest:
    """Every experts module's statistics in `folder` (a statistics store); those already there and verified are
    kept. `checkpoint` is the source checkpoint's index (compression.checkpoint_index) and read_gate_up(experts) reads
    a module's gate and up weights from it. Under torch.distributed every process calls it, with the same batches:
    each runs its share of them. Each module keeps the inputs of its first `keep_inputs` tokens (under
    torch.distributed, of the first process's share), and with `weigh` their weights (calibration/sensitivity.py):
    in one process from the statistics pass, under torch.distributed before it, by every process on its share of
    those tokens' batches."""
    ranks = current_ranks()
    rank, world = ranks.rank, ranks.world_size
    manifest = Manifest(folder)
    names = [experts.name for experts in checkpoint.experts]
    done = manifest.done(names)
    unweighed = weigh and len(manifest.done([sensitivity_unit(name) for name in names])) < len(names)
    if len(done) == len(names) and not unweighed:
        return manifest
    (folder / "units").mkdir(parents=True, exist_ok=True)
    on_disk = {experts.name: experts for experts in checkpoint.experts}
    with tempfile.TemporaryDirectory(dir=folder, prefix="offload-") as offload:
        model = offloaded_model(checkpoint, Path(offload), device)
        dtype = compute_dtype(model.dtype, device)
        # in one process the statistics pass also weighs, unless it has nothing left to gather
        alone = world == 1 and len(done) < len(names)
        if unweighed and not alone:
            _weigh(model, batches[::world], keep_inputs, manifest, device, dtype, progress, Path(offload))
        if len(done) < len(names):
            _gather(model, batches[rank::world], done, on_disk, read_gate_up, manifest, device, dtype, progress,
                    keep_inputs, unweighed and alone, Path(offload))
    return manifest
