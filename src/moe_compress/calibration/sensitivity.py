"""How much the model's loss depends on each calibration token's output of each MoE block: the weights of the
layer-wise reconstruction's objective.

A block's plain output error weighs every token alike, yet most of a token's error is harmless to the next-token loss
and some is not. BRECQ (Li et al. 2021) weighs block-wise reconstruction by the diagonal of the empirical Fisher, the
squared gradient of the loss at the block's output. Here each token t is weighed by ||dL/dy_t||, the norm of the
gradient of the original model's next-token loss L at the block's output y_t: one forward and backward of the model
over the kept calibration tokens, N floats per block. On the testbeds (one run each) the norm did better than its
square, whose few largest weights take most of the objective: at kept 0.5 on the fine-grained testbed +0.0054 nats
per byte against +0.0065 squared and +0.0170 unweighted; on the upcycled one at kept 0.3 +0.0113, +0.0127 and +0.0115.

    weights = token_sensitivity(model, batches, {"model.layers.0.mlp.experts": block, ...}, tokens=65536)

`token_sensitivity` runs one backward through the model as it is loaded; `layer_sensitivity` computes the same
layer by layer, each layer's weights read once forward and once backward, for a checkpoint whose layers are
offloaded to disk (calibration/offloaded.py): it keeps every layer's inputs on the kept tokens on the CPU instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._pytree import tree_map_only
from tqdm.auto import tqdm

from moe_compress.calibration.layers import LayerInputs, capture, logits_on
from moe_compress.discovery import find_experts

LOGITS_BUDGET = 2**28  # logit elements a forward and backward holds at once (1 GiB in fp32), times about 3


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No gradient into `module`'s parameters for the block."""
    grads = {p: p.requires_grad for p in module.parameters()}
    for p in grads:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, grad in grads.items():
            p.requires_grad_(grad)


def token_sensitivity(model: nn.Module, batches: list[torch.Tensor], blocks: dict[str, nn.Module],
                      tokens: int, progress: bool = False) -> dict[str, torch.Tensor]:
    """For each of `blocks` ({experts module name: the MoE block that calls it}), [T] fp32 on the CPU: the norm of
    the gradient of the model's summed next-token loss at the block's output, for the first T <= `tokens`
    calibration tokens in calibration order (the tokens the reconstruction keeps), normalised to mean 1 per block.
    A sequence's last token, which predicts nothing here, still weighs what its output passes to no later token:
    nothing (0). A batch of token ids [B, L] at a time (fewer rows where its logits would be large:
    rows_per_pass), the model in eval mode and its weights frozen; `progress` shows a bar over the batches."""
    found: dict[str, list[torch.Tensor]] = {name: [] for name in blocks}
    if not blocks:
        return {}
    # the graph starts at the first block's output (in the model's order, which its forward follows), since no
    # weight asks for a gradient and nothing before it is weighed: the backward stops there, short of its experts and
    # all before them (registered first, so that block_outputs keeps the output it makes)
    first = next(module for module in model.modules() if any(module is block for block in blocks.values()))
    hook = first.register_forward_hook(graph_start)
    was_training = model.training
    model.eval()
    device = model.get_input_embeddings().weight.device
    try:
        with frozen(model), torch.enable_grad():
            kept = first_batches(batches, tokens)
            for batch in tqdm(kept, desc="loss weights", unit="batch", disable=not progress):
                for ids in batch.split(rows_per_pass(model, batch.shape[1])):
                    ids = ids.to(device)
                    with block_outputs(blocks) as outputs:
                        loss = next_token_loss(model(input_ids=ids, use_cache=False).logits, ids)
                    grads = torch.autograd.grad(loss, list(outputs.values()), allow_unused=True)
                    for name, norms in gradient_norms(outputs, grads).items():
                        found[name].append(norms)
    finally:
        hook.remove()
        model.train(was_training)
    return {name: normalised(torch.cat(parts)[:tokens]) for name, parts in found.items()}


def graph_start(module: nn.Module, args, output):
    """A forward hook making a module's output hidden states (the first element of a tuple) a leaf that autograd
    differentiates from, cut from the graph before it."""
    if isinstance(output, tuple):
        return (output[0].detach().requires_grad_(), *output[1:])
    return output.detach().requires_grad_()


@contextmanager
def block_outputs(blocks: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """{name: the output hidden states of blocks[name]} of the forwards run in the block (a block returning a tuple
    gives its first element)."""
    outputs: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def keep_output(module: nn.Module, args, output) -> None:
            outputs[name] = output[0] if isinstance(output, tuple) else output
        return keep_output

    hooks = [block.register_forward_hook(keeper(name)) for name, block in blocks.items()]
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


def gradient_norms(outputs: dict[str, torch.Tensor], grads) -> dict[str, torch.Tensor]:
    """Each output's gradient's norm per token, [tokens] fp32 on the CPU (zeros where the loss did not reach it)."""
    return {name: (torch.zeros(output.shape[:-1]) if grad is None else grad.float().norm(dim=-1).cpu()).reshape(-1)
            for (name, output), grad in zip(outputs.items(), grads)}


def normalised(weights: torch.Tensor) -> torch.Tensor:
    """`weights` over their mean (all ones where every weight is 0: nothing to tell the tokens apart)."""
    mean = weights.mean()
    return weights / mean if mean > 0 else torch.ones_like(weights)


def rows_per_pass(model: nn.Module, length: int) -> int:
    """How many sequences of `length` tokens one forward and backward takes: as many as keep their logits, in fp32,
    within LOGITS_BUDGET elements (one sequence of 2,048 tokens at Qwen3's 151,936-entry vocabulary is 1.2 GiB)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return max(1, LOGITS_BUDGET // (length * vocab))


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The summed next-token cross-entropy of logits [B, L, V] on the token ids [B, L] they were computed from."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device),
                           reduction="sum")


def first_batches(batches: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """The batches that hold the first `tokens` tokens."""
    kept, seen = [], 0
    for ids in batches:
        if seen >= tokens:
            break
        kept.append(ids)
        seen += ids.numel()
    return kept


def layer_sensitivity(model: nn.Module, batches: list[torch.Tensor], tokens: int, dtype: torch.dtype | None = None,
                      around_layer: Callable[[nn.Module], AbstractContextManager] = lambda layer: nullcontext(),
                      progress: bool = False, spill: Path | None = None, share: tuple[int, int] = (0, 1),
                      total: Callable[[torch.Tensor], torch.Tensor] = lambda weights: weights,
                      desc: str = "loss weights") -> dict[str, torch.Tensor]:
    """token_sensitivity of every experts module of `model`, computed one decoder layer at a time
    (layer_gradient_norms, whose arguments these are) for a checkpoint whose layers are offloaded to disk. With
    `share` (rank, world), this process computes the norms of the kept batches [rank::world] alone, and total(norms)
    must sum them over the processes (an all-reduce): placed_weights."""
    kept = first_batches(batches, tokens)
    mine = kept[share[0]::share[1]]
    found = layer_gradient_norms(model, mine, dtype, around_layer, progress, spill, desc) if mine else {}
    return placed_weights(model, kept, tokens, found, share, total)


def placed_weights(model: nn.Module, kept: list[torch.Tensor], tokens: int, found: dict[str, list[torch.Tensor]],
                   share: tuple[int, int] = (0, 1),
                   total: Callable[[torch.Tensor], torch.Tensor] = lambda weights: weights) -> dict[str, torch.Tensor]:
    """The weights of the first `tokens` tokens of the batches `kept` for every experts module of `model`, from this
    process's norms `found` (layer_gradient_norms of kept[rank::world], `share` being (rank, world)): each batch's
    norms in its place among zeros, total(norms) the sum over the processes, normalised."""
    rank, world = share
    ends = torch.tensor([ids.numel() for ids in kept]).cumsum(0).tolist()
    weights = {}
    for name, _ in find_experts(model):  # every process, in the same order, whatever batches it took
        norms = torch.zeros(ends[-1])
        for batch, part in zip(range(rank, len(kept), world), found.get(name, [])):
            norms[ends[batch] - part.numel():ends[batch]] = part
        weights[name] = normalised(total(norms)[:tokens])
    return weights


class LayerTrace:
    """What a forward through the decoder layers keeps for layer_gradient_norms' backward: each layer's inputs on
    the batches, on the CPU or with `spill` in files in that folder (12 GiB at Qwen3-30B-A3B's 48 layers, 65,536
    tokens in bf16)."""

    def __init__(self, spill: Path | None = None):
        self.spill = spill
        self.inputs: list[list[torch.Tensor] | Path] = []  # per layer: [B, L, H] per batch, or their spill file

    def keep(self, index: int, hidden: list[torch.Tensor]) -> None:
        """Layer `index`'s inputs (the layers come in order)."""
        hidden = [h.cpu() for h in hidden]
        if self.spill is not None:
            path = self.spill / f"layer-{index}.safetensors"
            save_file({str(b): h.contiguous() for b, h in enumerate(hidden)}, path)
            hidden = path
        self.inputs.append(hidden)

    def layer_inputs(self, index: int) -> list[torch.Tensor]:
        """Layer `index`'s inputs, read back (a spill file removed once read)."""
        kept = self.inputs[index]
        return unspilled(kept) if isinstance(kept, Path) else kept

    def drop(self, index: int) -> None:
        """Layer `index`'s inputs let go unread (a spill file removed)."""
        kept, self.inputs[index] = self.inputs[index], []
        if isinstance(kept, Path):
            kept.unlink()


def layer_gradient_norms(model: nn.Module, batches: list[torch.Tensor], dtype: torch.dtype | None = None,
                         around_layer: Callable[[nn.Module], AbstractContextManager] = lambda layer: nullcontext(),
                         progress: bool = False, spill: Path | None = None,
                         desc: str = "loss weights") -> dict[str, list[torch.Tensor]]:
    """For every experts module of `model` (in model order), per batch [B * L]: the norm of the gradient of the
    model's summed next-token loss at its block's output, computed one decoder layer at a time: forward through the
    layers keeping each one's inputs (a LayerTrace, with `spill`), then traced_backward. Batches are independent, so
    processes may each take some. `dtype` and `around_layer` are how a layer runs (calibration/layers.py:
    LayerInputs.run), here with gradients; `progress` shows a bar (`desc`) over the layers, each counted forward and
    backward."""
    inputs, trace = capture(model, batches), LayerTrace(spill)
    bar = tqdm(total=2 * len(inputs.layers), desc=desc, unit="layer", disable=not progress)
    for index in range(len(inputs.layers)):
        bar.update()
        trace.keep(index, inputs.hidden)
        with around_layer(inputs.layers[index]):
            inputs.advance(index, inputs.run(index, dtype))
    found = traced_backward(model, batches, inputs, trace, dtype, around_layer, bar)
    bar.close()
    return found


def traced_backward(model: nn.Module, batches: list[torch.Tensor], inputs: LayerInputs, trace: LayerTrace,
                    dtype: torch.dtype | None = None,
                    around_layer: Callable[[nn.Module], AbstractContextManager] = lambda layer: nullcontext(),
                    bar: tqdm | None = None) -> dict[str, list[torch.Tensor]]:
    """layer_gradient_norms' backward, after a forward of the token-id `batches` through every layer that left the
    last layer's outputs in `inputs` (and maybe more batches after them) and every layer's inputs in `trace`: the
    loss's gradient at the last layer's outputs through what follows the layers, then back through the layers, each
    run again on its inputs for its backward (`bar` counts them)."""
    layers, grads = inputs.layers, []
    with frozen(model), torch.enable_grad():
        for batch, last in zip(batches, inputs.hidden):
            rows = rows_per_pass(model, batch.shape[1])
            parts = []
            for ids, outputs in zip(batch.split(rows), last.split(rows)):
                outputs = outputs.clone().requires_grad_()  # a copy outside inference mode, which autograd can use
                parts.append(torch.autograd.grad(next_token_loss(logits_on(model, ids, outputs), ids), outputs)[0])
            grads.append(torch.cat(parts))
    found: dict[str, list[torch.Tensor]] = {name: [] for index in range(len(layers))
                                            for name in inputs.experts_of(index, model)}  # in the model's order
    # nothing before the first layer with experts is weighed (a model's leading dense layers): no backward runs
    # there, and that layer's stops at its blocks' outputs, short of its experts and attention
    first = next((index for index in range(len(layers)) if inputs.experts_of(index, model)), len(layers))
    for index in reversed(range(len(layers))):
        if bar is not None:
            bar.update()
        if index < first:
            trace.drop(index)
            continue
        within = [name.removeprefix(f"{inputs.prefix}.{index}.") for name in inputs.experts_of(index, model)]
        blocks = {name: name.rpartition(".")[0] for name in within}  # experts module: its block, within the layer
        with around_layer(layers[index]), frozen(layers[index]), torch.enable_grad():
            for batch, (hidden, kwargs) in enumerate(zip(trace.layer_inputs(index), inputs.kwargs[index])):
                norms, grads[batch] = layer_backward(layers[index], blocks, hidden, kwargs, grads[batch], dtype,
                                                     through=index > first)
                for name, norm in norms.items():
                    found[f"{inputs.prefix}.{index}.{name}"].append(norm)
    return found


def unspilled(path: Path) -> list[torch.Tensor]:
    """The batches' tensors a spill file holds, in order; the file removed."""
    found = load_file(path)
    path.unlink()
    return [found[str(batch)] for batch in range(len(found))]


def layer_backward(layer: nn.Module, blocks: dict[str, str], hidden: torch.Tensor, kwargs: dict, grad: torch.Tensor,
                   dtype: torch.dtype | None,
                   through: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """One decoder layer run on one batch of its inputs `hidden` [B, L, H] (with `dtype`, computing in it), and the
    gradient `grad` at its outputs taken back through it: the gradient's norm at each of its MoE blocks' outputs
    per token [B * L] (`blocks`: {experts module name within the layer: its block's}), and with `through` the
    gradient at its inputs (else None: the backward stops at the blocks' outputs, short of their experts and the
    attention)."""
    device = grad.device
    x = hidden.to(device).clone().requires_grad_()
    cast = partial(tree_map_only, torch.Tensor, lambda t: (t.to(dtype) if dtype is not None and t.is_floating_point()
                                                           else t).clone())  # clones: outside inference mode
    with block_outputs({name: layer.get_submodule(block) for name, block in blocks.items()}) as outputs:
        y = layer(cast(x), **cast(kwargs))
    wanted = [x] if through else []
    found = torch.autograd.grad(y, [*wanted, *outputs.values()], grad.to(y.dtype), allow_unused=True)
    return gradient_norms(outputs, found[len(wanted):]), found[0].to(grad.dtype) if through else None
