"""Question 1: quality at equal storage on the trained testbed.

For kept fractions of expert parameters of about 0.2, 0.3 and 0.5: each method of `compress` (seed `adam` at its
specified steps, the default `als`, `delta`), and two references: mean-only (every expert = the mean, one point) and
per-expert truncated SVD at the same storage. Figures: relative reconstruction error, held-out loss in nats per byte on
the testbed's validation split and its increase over the original, fit time (median of `repeats` runs).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from benchmarks.common import plot_to, table
from moe_compress import CompressionConfig, compress, find_experts
from moe_compress.discovery import join_weights, split_weights
from moe_compress.testbed import heldout_loss, load_testbed, read_split

FULL = dict(ratios=(0.2, 0.3, 0.5), methods=("adam", "als", "delta"), repeats=3, max_tokens=None)
QUICK = dict(ratios=(0.3,), methods=("als", "delta"), repeats=1, max_tokens=4096, adam_steps=5, polish_steps=5)


def replace_experts(model, transform) -> tuple[torch.nn.Module, float]:
    """A copy of the model whose expert weights W [E, out, in] are replaced by transform(W); the relative error."""
    model = copy.deepcopy(model)
    err2 = norm2 = 0.0
    for _, experts in find_experts(model):
        parts = split_weights(experts)
        new = {}
        for name, (W, bias) in parts.items():
            W_hat = transform(W.float())
            err2 += (W.float() - W_hat).square().sum().item()
            norm2 += W.float().square().sum().item()
            new[name] = (W_hat.to(W.dtype), bias)
        with torch.no_grad():
            for key, value in join_weights(experts, new).items():
                getattr(experts, key).copy_(value)
    return model, (err2 / norm2) ** 0.5


def mean_only(W: torch.Tensor) -> torch.Tensor:
    return W.mean(0, keepdim=True).expand_as(W)


def per_expert_svd(ratio: float):
    """Each expert's own truncated SVD, its rank chosen so that E*k*(out+in) <= ratio * E*out*in."""
    def transform(W: torch.Tensor) -> torch.Tensor:
        _, out_f, in_f = W.shape
        k = max(1, int(ratio * out_f * in_f / (out_f + in_f)))
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return (U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]
    return transform


def run(quick: bool = False) -> dict:
    setting = QUICK if quick else FULL
    original, _ = load_testbed(torch.float32)
    text = read_split("validation")
    loss = lambda model: heldout_loss(model, text, max_tokens=setting["max_tokens"])
    base = loss(original)
    rows = []
    mean_model, mean_error = replace_experts(original, mean_only)
    rows.append({"method": "mean only", "ratio": 1 / find_experts(original)[0][1].down_proj.shape[0],
                 "rel_error": mean_error, "loss": loss(mean_model), "seconds": 0.0})
    for ratio in setting["ratios"]:
        svd_model, svd_error = replace_experts(original, per_expert_svd(ratio))
        rows.append({"method": "per-expert SVD", "ratio": ratio, "rel_error": svd_error, "loss": loss(svd_model),
                     "seconds": 0.0})
        for method in setting["methods"]:
            extra = {k: setting[k] for k in ("adam_steps", "polish_steps") if k in setting}
            config = CompressionConfig(target_ratio=ratio, method=method, **extra)
            times = []
            for _ in range(setting["repeats"]):
                model = copy.deepcopy(original)
                start = time.perf_counter()
                report = compress(model, config, progress=False)
                times.append(time.perf_counter() - start)
            rows.append({"method": method, "ratio": report.kept_fraction, "target": ratio,
                         "rel_error": report.rel_error, "loss": loss(model), "seconds": statistics.median(times)})
    for row in rows:
        row["increase"] = row["loss"] - base
    return {"setting": setting, "original_loss": base, "rows": rows}


LABELS = {"adam": "seed adam", "als": "default (als)", "delta": "delta (C + UV^T)"}


def plot(result: dict, path: str) -> None:
    """Loss increase over the original against kept fraction, log scale: the methods differ by orders of magnitude."""
    title = f"Testbed: quality at equal storage (original {result['original_loss']:.4f}; lower is better)"
    with plot_to(path, title, "kept fraction of expert parameters",
                 "held-out loss increase over the original (nats/byte)", title_size=10) as ax:
        for method in ("per-expert SVD", *result["setting"]["methods"]):
            points = sorted((r["ratio"], r["increase"]) for r in result["rows"] if r["method"] == method)
            ax.plot(*zip(*points), marker="o", label=LABELS.get(method, method))
        mean = next(r for r in result["rows"] if r["method"] == "mean only")
        ax.scatter([mean["ratio"]], [mean["increase"]], marker="x", color="black", label="mean only", zorder=3)
        ax.set_yscale("log")


def markdown(result: dict) -> str:
    rows = [[LABELS.get(r["method"], r["method"]), f"{r['ratio']:.3f}", f"{r['rel_error']:.4f}", f"{r['loss']:.4f}",
             f"{r['increase']:+.4f}", f"{r['seconds']:.2f}" if r["seconds"] else "-"] for r in result["rows"]]
    return (f"Original held-out loss: **{result['original_loss']:.4f}** nats per byte (validation split).\n\n"
            + table(["method", "kept fraction", "rel. error", "held-out loss", "increase", "fit s (median)"], rows)
            + delta_note(result["rows"]))


def delta_note(rows: list[dict]) -> str:
    """What the additive baseline against the wrapper means, with this run's outcome."""
    by = {(r["method"], round(r["ratio"], 3)): r for r in rows}
    pairs = [(by[("als", k[1])], r) for k, r in by.items() if k[0] == "delta" and ("als", k[1]) in by]
    if not pairs:
        return ""
    wins = sum(delta["rel_error"] <= als["rel_error"] for als, delta in pairs)
    return ("\n\nThe additive `delta` form stores exactly what the wrapper stores (2r(out + in) per expert and the "
            "core) and can represent every wrapper, since (I + A B^T) C (I + P Q^T) - C has rank at most 2r: at equal "
            "storage its best fit can only match or beat the wrapper's in reconstruction error. In this run it has the "
            f"lower error at {wins} of {len(pairs)} kept fractions.")


if __name__ == "__main__":
    result = run()
    print(markdown(result))
    plot(result, "benchmarks/quality.png")
