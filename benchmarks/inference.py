"""Question 3: is the compressed experts module faster than the original one?

The original is transformers' Qwen3MoeExperts with its default experts implementation (grouped_mm), the compressed one
SharedCoreExperts in each form at the storage of wrapper ranks 16 and 64 (delta at the same rank; the shared basis at
the width k that stores as much; mixed: that basis for gate and up, delta for down), all fp32 with random weights
(speed does not depend on the values), at Qwen3-30B-A3B shapes: E=128 experts, top-8, hidden 2048, expert width 768.
Timing: medians of interleaved runs in one process.
Memory: peak resident memory of a fresh process that builds one module and runs one forward.
"""

from __future__ import annotations

import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from benchmarks.common import in_fresh_process, interleaved_medians, peak_rss_mib, table
from moe_compress import ModuleSpec, SharedCoreExperts
from moe_compress.compression.budget import max_rank, stored_params
from moe_compress.compression.config import MIXED_FORMS, PROJECTIONS

FULL = dict(num_experts=128, top_k=8, hidden=2048, width=768, tokens=(1, 64, 512), ranks=(16, 64), repeats=7,
            forms=("wrapped", "delta", "basis", "mixed"))
QUICK = dict(num_experts=8, top_k=2, hidden=64, width=32, tokens=(16,), ranks=(4,), repeats=2, forms=("mixed",))


def build(kind: str, shape: dict) -> torch.nn.Module:
    config = Qwen3MoeConfig(hidden_size=shape["hidden"], moe_intermediate_size=shape["width"],
                            num_experts=shape["num_experts"], num_experts_per_tok=shape["top_k"])
    config._experts_implementation = "grouped_mm"  # what from_pretrained picks by default
    original = Qwen3MoeExperts(config)
    module = original
    if kind != "original":
        form, rank = kind.split()[0], int(kind.split()[-1])
        forms = MIXED_FORMS if form == "mixed" else dict.fromkeys(PROJECTIONS, form)
        E, F, H = shape["num_experts"], shape["width"], shape["hidden"]
        # a basis gets the width that stores what the wrapper does at `rank` (gate, up and down alike)
        ranks = {p: max_rank(E, F, H, stored_params(E, F, H, rank), "basis") if f == "basis" else rank
                 for p, f in forms.items()}
        module = SharedCoreExperts.empty(original, ModuleSpec(forms, ranks))
        del original
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module.eval()


def routing(tokens: int, shape: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, shape["hidden"], generator=g)
    index = torch.stack([torch.randperm(shape["num_experts"], generator=g)[: shape["top_k"]] for _ in range(tokens)])
    return x, index, torch.softmax(torch.randn(tokens, shape["top_k"], generator=g), -1)


def peak_memory(kind: str, tokens: int, shape: dict) -> tuple[float, float]:
    """(weights MiB, peak resident MiB) of building one module and running one forward; run it in a fresh process."""
    module = build(kind, shape)
    with torch.no_grad():
        module(*routing(tokens, shape))
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20, peak_rss_mib()


def run(quick: bool = False) -> dict:
    shape = QUICK if quick else FULL
    kinds = ["original"] + [f"{form} rank {r}" for r in shape["ranks"] for form in shape["forms"]]
    modules = {kind: build(kind, shape) for kind in kinds}
    rows = []
    for tokens in shape["tokens"]:
        inputs = routing(tokens, shape)
        with torch.no_grad():
            seconds = interleaved_medians({k: (lambda m=m: m(*inputs)) for k, m in modules.items()}, shape["repeats"])
        for kind in kinds:
            weights, peak = in_fresh_process(peak_memory, kind, tokens, shape)
            rows.append({"tokens": tokens, "module": kind, "tokens_per_s": tokens / seconds[kind],
                         "ms": 1e3 * seconds[kind], "speedup": seconds["original"] / seconds[kind],
                         "weights_mib": weights, "peak_rss_mib": peak})
    return {"shape": shape, "rows": rows}


def markdown(result: dict) -> str:
    s = result["shape"]
    header = ["tokens", "module", "ms (median)", "tokens/s", "speed-up vs original", "weights MiB", "peak RSS MiB"]
    rows = [[r["tokens"], r["module"], f"{r['ms']:.2f}", f"{r['tokens_per_s']:,.0f}", f"{r['speedup']:.2f}x",
             f"{r['weights_mib']:,.0f}", f"{r['peak_rss_mib']:,.0f}"] for r in result["rows"]]
    return (f"E={s['num_experts']}, top-{s['top_k']}, hidden {s['hidden']}, width {s['width']}, fp32, "
            f"median of {s['repeats']} interleaved runs; `basis rank r` is the shared basis of the width that stores "
            "what the wrapper stores at rank r; `mixed rank r` that basis for gate and up and delta for down.\n\n"
            + table(header, rows))


if __name__ == "__main__":
    print(markdown(run()))
