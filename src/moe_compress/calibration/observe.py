"""Calibration: run token batches through a model and observe every experts module's routed inputs.

Every forward of an experts module receives what its router chose, and an observer sees exactly that:

    observer(experts, hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K])

Observers accumulate per-module statistics: routing counts here; saliencies and mean expert outputs for the peer
methods (peers.py); Gram matrices for calibration-aware fits.

    counts = observe(model, token_ids, RoutingCounts)     # {experts module name: RoutingCounts}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from moe_compress.discovery import find_experts, is_experts_module

ROUTED_INPUTS = ("hidden_states", "top_k_index", "top_k_weights")
Calibration = torch.Tensor | Iterable[torch.Tensor]  # token ids [N, L], or batches of them [B, L]


class Observer(Protocol):
    def __call__(self, experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> None: ...


O = TypeVar("O", bound=Observer)


class RoutingCounts:
    """tokens[e]: how many calibration tokens the router sent to expert e (a token counts once for each of its K
    experts)."""

    def __init__(self, experts: nn.Module):
        self.tokens = torch.zeros(experts.num_experts, dtype=torch.long, device=experts.down_proj.device)  # [E]

    def __call__(self, experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> None:
        self.tokens += torch.bincount(top_k_index.flatten(), minlength=self.tokens.numel())


def _observer_hook(observer: Observer) -> Callable:
    """A forward pre-hook handing the routed inputs to `observer`, however the MoE block passed them: the experts
    interface fixes their order, (hidden_states, top_k_index, top_k_weights), and some blocks name them."""

    def hook(experts: nn.Module, args: tuple, kwargs: dict) -> None:
        observer(experts, *args, *(kwargs[name] for name in ROUTED_INPUTS[len(args):]))

    return hook


@contextmanager
def observing(model: nn.Module, observers: dict[str, Observer]) -> Iterator[None]:
    """Within the block, every forward of the experts module named `name` first calls observers[name] with its
    routed inputs; the hooks are gone afterwards, whatever happens."""
    # not find_experts: a layer-by-layer pass observes nothing in the layers after the last one with experts, by
    # which time a model compressed on the way has none left in their original form
    modules = {name: module for name, module in model.named_modules() if is_experts_module(module)}
    unknown = sorted(set(observers) - set(modules))
    if unknown:
        raise ValueError(f"no experts module named {unknown[0]!r} in this model; use names from find_experts(model)")
    with _removed_after([modules[name].register_forward_pre_hook(_observer_hook(observer), with_kwargs=True)
                         for name, observer in observers.items()]):
        yield


@contextmanager
def observing_blocks(model: nn.Module, observers: dict[str, Callable[[torch.Tensor], None]]) -> Iterator[None]:
    """Within the block, every forward of the module that holds the experts module `name` (its MoE block) hands the
    block's output hidden states (the first element of a tuple) to observers[name]; the hooks are gone afterwards."""
    def hook(observer: Callable[[torch.Tensor], None]) -> Callable:
        return lambda block, args, output: observer(output[0] if isinstance(output, tuple) else output)

    with _removed_after([model.get_submodule(name.rpartition(".")[0]).register_forward_hook(hook(observer))
                         for name, observer in observers.items()]):
        yield


@contextmanager
def _removed_after(handles: list[RemovableHandle]) -> Iterator[None]:
    """The hooks of `handles` removed when the block ends, whatever happens."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_ids(ids: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32):
        got = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(
            f"calibration token ids must be an integer tensor [N, L]; got {got}; "
            "pass token ids (e.g. tokenizer(texts, return_tensors='pt').input_ids), or an iterable of such batches"
        )


def token_batches(calibration: Calibration, batch_size: int) -> Iterable[torch.Tensor]:
    """Batches of token ids from calibration data: a LongTensor [N, L] split into `batch_size` sequences, or an
    iterable of such batches as it is."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1 sequence")
    if isinstance(calibration, torch.Tensor):
        _check_ids(calibration)
        return calibration.split(batch_size)
    return calibration


def observe(model: nn.Module, calibration: Calibration, make_observer: Callable[[nn.Module], O],
            batch_size: int = 8, progress: bool = True) -> dict[str, O]:
    """Run the calibration tokens through `model` (eval mode, inference mode) with one observer per experts module,
    made by make_observer(experts); return them by module name.

    `calibration` is a LongTensor [N, L] of token ids, read in batches of `batch_size` sequences, or an iterable of
    such batches.
    """
    observers = {name: make_observer(experts) for name, experts in find_experts(model)}
    batches = token_batches(calibration, batch_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # routers behave as at inference (no jitter), as the compressed model will be used
    try:
        with observing(model, observers), torch.inference_mode():
            total = len(batches) if hasattr(batches, "__len__") else None
            for ids in tqdm(batches, total=total, desc="calibration", unit="batch", disable=not progress):
                _check_ids(ids)
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        model.train(was_training)
    return observers
