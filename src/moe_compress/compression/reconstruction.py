"""Layer-wise reconstruction: after the closed-form fits, train a compressed MoE block's stored tensors so that its
output on the calibration tokens' inputs matches the original block's.

The closed-form fits see each projection alone, in the metric of its own routed inputs. They cannot see the activation
between gate/up and down, how the three projections' errors compound, or that a token sums its top-k experts' outputs
(errors common to the experts add up). The block's output sees all of it, and costs one block and its inputs in memory:
block-wise reconstruction as post-training quantization does it (BRECQ, Li et al. 2021; OmniQuant, Shao et al. 2024),
with the router optionally trained too, as router calibration of pruned or merged MoEs does.

    error = reconstruct(name, block, original, compressed, x, config, seed)  # compressed left in the block, trained

Quantized tensors train through their rounding: float shadows read through the stored format with a
straight-through gradient, scales and zero points fixed, their codes written back at the end. Shapes: N calibration
tokens, H hidden, B tokens a step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from moe_compress.calibration.sensitivity import frozen
from moe_compress.compression.config import ReconstructionConfig
from moe_compress.compression.report import BlockError
from moe_compress.experts import SharedCoreExperts

FUSED_ADAM = ("cpu", "cuda")  # devices torch's fused Adam runs on
EVAL_CHUNK = 4096  # tokens per forward when the whole calibration set is run without gradients
# the share of the tokens (the last calibration sequences) whose block output error judges a reconstruction: the
# error of all of them cost about a third of the reconstruction's time on the testbeds, and 8,192 of the default
# 65,536 tokens judge it as well
JUDGED = 1 / 8


def slot_of(block: nn.Module, experts: nn.Module) -> str:
    """The attribute of `block` that holds `experts`."""
    for name, child in block.named_children():
        if child is experts:
            return name
    raise ValueError("the experts module is not a child of its MoE block; reconstruction needs the block that calls it")


def router_parameters(block: nn.Module, experts: nn.Module) -> list[nn.Parameter]:
    """The router's trainable weights: the block's parameters outside the experts with one row per expert."""
    inside = {id(p) for p in experts.parameters()}
    return [p for p in block.parameters() if id(p) not in inside and p.dim() >= 1 and p.shape[0] == experts.num_experts]


def outputs(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's output on token inputs x [N, H] as one sequence: [N, H] (a block returning a tuple gives its
    first element, the hidden states)."""
    y = block(x.unsqueeze(0))
    return (y[0] if isinstance(y, tuple) else y).reshape(x.shape)


@torch.no_grad()
def outputs_in_chunks(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([outputs(block, chunk) for chunk in x.split(EVAL_CHUNK)])


def relative_error(block: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """||y_hat - y|| / ||y|| over the tokens, each token's squares weighted by `weights` [N] when given."""
    y_hat = outputs_in_chunks(block, x)
    errors, norms = (y_hat - y).square().sum(-1), y.square().sum(-1)
    if weights is not None:
        errors, norms = errors * weights, norms * weights
    return (errors.sum() / norms.sum().clamp_min(1e-30)).sqrt().item()


@contextmanager
def in_fp32(module: nn.Module) -> Iterator[None]:
    """Every floating parameter of `module` in fp32 for the block (Adam's small steps would vanish in bf16's rounding),
    back in its own dtype after."""
    dtypes = {p: p.dtype for p in module.parameters()}
    for p in dtypes:
        if p.is_floating_point():
            p.data = p.data.float()
    try:
        yield
    finally:
        for p in module.parameters():
            p.data = p.data.to(dtypes.get(p, p.dtype))


@contextmanager
def training(block: nn.Module, compressed: SharedCoreExperts, router: bool) -> Iterator[list[nn.Parameter]]:
    """The block ready to train, in fp32: the compressed experts' stored tensors (quantized ones as float shadows)
    and, with `router`, the router's weights trainable, everything else frozen; after, the shadows' codes written and
    every parameter as it was."""
    projections = list(compressed.projections.values())
    for proj in projections:
        proj.train_quantization_aware_(proj.stored)
    wanted = [p for proj in projections for p in proj.parameters()]
    if router:
        wanted += router_parameters(block, compressed)
    with frozen(block), in_fp32(block):
        for p in wanted:
            p.requires_grad_(True)
        try:
            yield wanted
        finally:
            with torch.no_grad():
                for proj in projections:
                    proj.end_quantization_aware_()


def batches(tokens: int, batch: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """`steps` batches of token indices: passes over a seeded permutation of the tokens, `batch` at a time."""
    generator = torch.Generator().manual_seed(seed)
    batch = min(batch, tokens)
    per_pass = tokens // batch
    for step in range(steps):
        if step % per_pass == 0:
            order = torch.randperm(tokens, generator=generator)
        yield order[(step % per_pass) * batch:(step % per_pass + 1) * batch]


@dataclass
class Normed:
    """The objective after the residual and the next layer's norm: `norm`, the next decoder layer's input norm (the
    model's final norm after the last layer), and the decoder layer's outputs [N, H] on the kept tokens, from which
    the residual stream is the layer's output less the block's."""

    norm: nn.Module
    layer_outputs: torch.Tensor


def judged(tokens: int) -> int:
    """How many of `tokens` (the last ones: the last calibration sequences) judge the reconstruction: JUDGED of them,
    at least one, and one fewer than all so that one is left to train on when they are held out."""
    return min(max(1, round(tokens * JUDGED)), max(1, tokens - 1))


def reconstruct(name: str, block: nn.Module, original: nn.Module, compressed: SharedCoreExperts, x: torch.Tensor,
                config: ReconstructionConfig, seed: int, normed: Normed | None = None,
                targets: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> BlockError:
    """Put `compressed` in place of `original` in `block` and train it (with config.router, the router too) so that
    the block's output on the inputs x [N, H] matches what it was with `original`, `targets` [N, H] (the calibration
    pass observes them as it runs the original block; computed here, in fp32, when not given), or with `normed` the
    next layer's normalised input, norm(residual + output): Adam on the squared error relative to the targets' mean
    square, each token's weighted by `weights` [N] when given (calibration/sensitivity.py), over config.steps batches
    of config.batch_tokens, its learning rate decaying to 0 on a cosine. The last JUDGED of the tokens judge it (with
    config.held_out, they are not trained on): it is kept only where it lowers the block's output error on them,
    weighted as trained, otherwise the block is left as the fit left it; the errors reported are theirs."""
    start = time.perf_counter()
    slot = slot_of(block, original)
    was_training = block.training
    block.eval()  # routers as at inference: no jitter
    norm = nn.Identity() if normed is None else normed.norm
    try:
        x = x.to(compressed.projections["down"].expert_core.device)
        last = slice(len(x) - judged(len(x)), None)
        trained = last.start if config.held_out and last.start else len(x)  # one token alone: trained and judged
        if targets is not None:
            y = targets.to(x.device, torch.float32)
        else:
            with in_fp32(block):  # the original block in fp32 too: targets as exact as they can be
                y = outputs_in_chunks(block, x)
        # the residual stream beside the block's output, for the normed objective (None: the block's output alone,
        # and its targets are y itself: at 65,536 kept tokens each [N, H] copy is 0.5 GiB at hidden 2048)
        residual = None if normed is None else normed.layer_outputs.to(y.device) - y
        w = torch.ones(len(x), 1, device=x.device) if weights is None else weights.to(x.device, torch.float32)[:, None]
        judged_weights = None if weights is None else w[last, 0]
        setattr(block, slot, compressed)
        with training(block, compressed, config.router) as params, in_fp32(norm), frozen(norm), torch.no_grad():
            target = y if residual is None else torch.cat([norm(r + chunk) for r, chunk in
                                                           zip(residual.split(EVAL_CHUNK), y.split(EVAL_CHUNK))])
            before = relative_error(block, x[last], y[last], judged_weights)
            kept = [p.detach().clone() for p in params]
            # fused: one kernel for every tensor's update, where the default loops over them in Python on the CPU
            optimizer = torch.optim.Adam(params, lr=config.lr, fused=all(p.device.type in FUSED_ADAM for p in params))
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / config.steps)))
            scale = (w[:trained] * target[:trained].square()).mean()
            with torch.enable_grad():
                for index in batches(trained, config.batch_tokens, config.steps, seed):
                    # index_select, not indexing: 5x quicker for a step's 1,024 rows of the kept 65,536 on the CPU
                    rows = partial(torch.index_select, dim=0, index=index.to(x.device))
                    predicted = outputs(block, rows(x))
                    predicted = predicted if residual is None else norm(rows(residual) + predicted)
                    loss = (rows(w) * (predicted - rows(target)).square()).mean() / scale
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
            after = relative_error(block, x[last], y[last], judged_weights)
            if not after < before:
                with torch.no_grad():
                    for p, value in zip(params, kept):
                        p.copy_(value)
                after = before
    finally:
        block.train(was_training)
    return BlockError(name, before, after, config.steps, time.perf_counter() - start)
