"""The layer-by-layer pass of calibration tokens through a model's decoder, as GPTQ and llm-compressor's sequential
pipeline run one: each decoder layer sees the outputs of the layers before it, as they are when it is reached (so a
layer compressed on the way passes its own outputs on), and only one layer works at a time.

    inputs = capture(model, batches)            # what the first decoder layer receives, and each layer's kwargs
    for index, layer in enumerate(inputs.layers):
        outputs = inputs.run(index)             # observe its experts meanwhile (observe.observing)
        ... compress the layer's experts ...
        inputs.advance(index)                   # its outputs, recomputed as it now is, feed the next layer

`layer_statistics` is that loop with the experts' statistics gathered on the way; it serves a loaded model
(`loaded_statistics`) and one whose layers are offloaded to disk (offloaded.py) alike.

Decoder layers are found as the ModuleList that holds every experts module; each is called by the model's own loop
as layer(hidden_states, **kwargs) -> hidden_states, which is how transformers 5 runs all its decoder models. The
keyword arguments (masks, position embeddings) are recorded once per layer and batch by running the model with every
layer replaced by a recorder that passes its input through (and answers for the layer's attributes, which some loops
read): the model's own code builds them, for every layer type.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only
from tqdm.auto import tqdm

from moe_compress.calibration.grams import ExpertGrams
from moe_compress.calibration.observe import observing, observing_blocks
from moe_compress.discovery import find_experts, is_experts_module


class _Done(Exception):
    """Raised by the last recorder: nothing after the decoder layers is needed (no norm, no logits)."""


class _Recorder(nn.Module):
    """Stands in for decoder layer `index`: records what the model's loop gives it and passes the hidden states on.
    Attributes it lacks are the layer's own, since the loop may read them to build the call (nemotron_h picks each
    layer's mask by its `block_type`)."""

    def __init__(self, index: int, layer: nn.Module, sink: LayerInputs, last: bool):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last
        self.__dict__["layer"] = layer  # not a submodule: the recorder holds no weights
        self.train(layer.training)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "layer" not in self.__dict__:  # still being built
                raise
            return getattr(self.__dict__["layer"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TypeError("a decoder layer was called with positional arguments beyond the hidden states; "
                            "this model's decoder loop is not supported by the layer-by-layer pass")
        if self.index == 0:
            self.sink.hidden.append(hidden_states)
        self.sink.kwargs[self.index].append(kwargs)
        if self.last:
            raise _Done
        return hidden_states


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and ModuleList of the decoder layers: the innermost ModuleList holding every experts module."""
    experts = [name for name, _ in find_experts(model)]
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)
             and all(e.startswith(f"{name}.") for e in experts)]
    if not found:
        raise ValueError("the experts modules do not sit in one list of decoder layers; the layer-by-layer "
                         "calibration pass needs a transformers decoder model")
    return max(found, key=lambda item: len(item[0]))


@dataclass
class LayerInputs:
    """The calibration batches as they reach the current layer, and the kwargs the model gives each layer."""

    prefix: str
    layers: nn.ModuleList
    hidden: list[torch.Tensor] = field(default_factory=list)  # per batch: [B, L, H], the current layer's inputs
    kwargs: list[list[dict]] = field(default_factory=list)  # per layer, per batch

    def experts_of(self, index: int, model: nn.Module) -> list[str]:
        """The experts modules of layer `index` still in their original form; none for a layer without experts (a
        hybrid model's mamba or attention layer) or once they are compressed."""
        return [name for name, module in model.named_modules()
                if name.startswith(f"{self.prefix}.{index}.") and is_experts_module(module)]

    @torch.inference_mode()
    def run(self, index: int, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Layer `index` on every batch of its inputs: its outputs. With `dtype`, the layer computes in it (its
        weights must already be in it): its inputs and floating kwargs cast to it, its outputs back to the inputs'."""
        layer, batches = self.layers[index], zip(self.hidden, self.kwargs[index])
        if dtype is None:
            return [layer(hidden, **kwargs) for hidden, kwargs in batches]
        cast = partial(tree_map_only, torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t)
        return [layer(cast(hidden), **cast(kwargs)).to(hidden.dtype) for hidden, kwargs in batches]

    def advance(self, index: int, outputs: list[torch.Tensor] | None = None) -> None:
        """The next layer's inputs: `outputs`, or layer `index` run anew (after it changed)."""
        self.hidden = outputs if outputs is not None else self.run(index)


class _Replayer(_Recorder):
    """Stands in for decoder layer `index` as a recorder does, and passes its input on; the last gives `output`
    instead (what the real layers computed), so that the model's own code runs what follows the layers on it."""

    def __init__(self, index: int, layer: nn.Module, output: torch.Tensor, last: bool):
        super().__init__(index, layer, None, last)
        self.__dict__["output"] = output

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.__dict__["output"] if self.last else hidden_states


@contextmanager
def standing_in(layers: nn.ModuleList, make: Callable[[int, nn.Module, bool], nn.Module]) -> Iterator[None]:
    """Every decoder layer replaced by make(index, layer, last) for the block, and put back after."""
    originals = list(layers)
    try:
        for index, layer in enumerate(originals):
            layers[index] = make(index, layer, index == len(layers) - 1)
        yield
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer


@torch.inference_mode()
def capture(model: nn.Module, batches: Iterable[torch.Tensor]) -> LayerInputs:
    """Run the model on token-id batches with every decoder layer replaced by a recorder: the first layer's inputs
    and every layer's kwargs, built by the model's own code (embeddings, masks, rotary embeddings)."""
    prefix, layers = decoder_layers(model)
    inputs = LayerInputs(prefix, layers, kwargs=[[] for _ in layers])
    device = next(model.parameters()).device
    with standing_in(layers, lambda index, layer, last: _Recorder(index, layer, inputs, last)):
        for ids in batches:
            try:
                model.base_model(input_ids=ids.to(device), use_cache=False)
            except _Done:
                pass
    return inputs


def logits_on(model: nn.Module, ids: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """The model's logits on token ids [B, L] where its last decoder layer outputs `outputs` [B, L, H]: what follows
    the layers (the final norm, the head) run by the model's own code, differentiable in `outputs`."""
    _, layers = decoder_layers(model)
    device = next(model.parameters()).device
    with standing_in(layers, lambda index, layer, last: _Replayer(index, layer, outputs, last)):
        return model(input_ids=ids.to(device), use_cache=False).logits


def release_free_heap() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing). A layer's pass frees
    tensors whose sizes follow the tokens each expert is routed, which glibc keeps resident for reuse and rarely
    reuses: at 128 experts of 1024 x 32, resident memory grew 6 MiB a layer without this, and stayed under the fits
    after the pass."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def layer_statistics(model: nn.Module, inputs: LayerInputs, wanted: Callable[[str], bool],
                     make_grams: Callable[[str], ExpertGrams], recompute: bool = False,
                     dtype: torch.dtype | None = None,
                     around_layer: Callable[[nn.Module], AbstractContextManager] = lambda layer: nullcontext(),
                     progress: bool = False, desc: str = "calibration",
                     before_layer: Callable[[int, list[torch.Tensor]], None] = lambda index, hidden: None
                     ) -> Iterator[dict[str, ExpertGrams]]:
    """Layer by layer, the statistics of the `wanted` experts modules of each decoder layer on the inputs that reach
    it ({} for a layer with none), each module's made by make_grams(name). Before the next layer the caller may
    replace that layer's modules; with `recompute` the layer's outputs passed on are then computed again, as it now
    is, otherwise they are the ones observed. `dtype` and `around_layer` are how the layer runs (LayerInputs.run, and
    a context such as the onloading of offloaded weights); before_layer(index, its inputs) sees each layer's inputs
    before it runs."""
    for index in tqdm(range(len(inputs.layers)), desc=desc, unit="layer", disable=not progress):
        names = [name for name in inputs.experts_of(index, model) if wanted(name)]
        grams = {name: make_grams(name) for name in names}
        kept = {name: stats.observe_block for name, stats in grams.items() if stats.keep_inputs}
        before_layer(index, inputs.hidden)
        with observing(model, grams), observing_blocks(model, kept), around_layer(inputs.layers[index]):
            outputs = inputs.run(index, dtype)
        for stats in grams.values():
            stats.observe_layer(outputs)
        yield grams
        inputs.advance(index, None if recompute and names else outputs)
        del grams, outputs
        release_free_heap()


def loaded_statistics(model: nn.Module, batches: list[torch.Tensor], names: Collection[str],
                      recompute: bool = False, keep_inputs: int = 0,
                      keep_outputs: bool = False) -> Iterator[dict[str, ExpertGrams]]:
    """layer_statistics of the experts modules `names` of a model loaded in memory, in eval mode for the pass, each
    keeping its first `keep_inputs` tokens' inputs (and with `keep_outputs`, their layer's outputs)."""
    was_training = model.training
    model.eval()
    try:
        inputs = capture(model, batches)
        yield from layer_statistics(model, inputs, lambda name: name in names,
                                    lambda name: ExpertGrams(model.get_submodule(name), keep_inputs=keep_inputs,
                                                             keep_outputs=keep_outputs),
                                    recompute)
    finally:
        model.train(was_training)
