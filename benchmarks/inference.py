"""Question 3: is the compressed experts module faster than the original one?

The original is transformers' Qwen3MoeExperts with its default experts implementation (grouped_mm), the compressed one
SharedCoreExperts in each form at the storage of wrapper ranks 16 and 64 (delta at the same rank; the shared basis at
the width k that stores as much; mixed: that basis for gate and up, delta for down), all fp32 with random weights
(speed does not depend on the values), at Qwen3-30B-A3B shapes: E=128 experts, top-8, hidden 2048, expert width 768.
Quantized rows (`4-bit`): every stored tensor in 4-bit groups of 128 (round to nearest), as compress(bits=4) keeps
them, dequantized once a forward; `original 4-bit` is the original experts so kept (method=quantize, kept 1.0), the
weight-only int4 quantization of the original on this path. torch's int4 weight-only kernel is timed apart on one
expert projection (`int4_kernel`), against the fp32 matmul of the same matrix.
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
from moe_compress.compression.fitting import quantized
from moe_compress.quantize import QuantFormat

FULL = dict(num_experts=128, top_k=8, hidden=2048, width=768, tokens=(1, 64, 512), ranks=(16, 64), repeats=7,
            forms=("wrapped", "delta", "basis", "mixed"), quantized=("original 4-bit", "mixed rank 16 4-bit"))
QUICK = dict(num_experts=8, top_k=2, hidden=64, width=32, tokens=(16,), ranks=(4,), repeats=2, forms=("mixed",),
             quantized=("original 4-bit", "mixed rank 4 4-bit"))
FORMAT = QuantFormat(4, 128)


def build(kind: str, shape: dict) -> torch.nn.Module:
    """A module of `kind`: "original", "<form> rank <r>", either followed by " 4-bit" for FORMAT storage."""
    config = Qwen3MoeConfig(hidden_size=shape["hidden"], moe_intermediate_size=shape["width"],
                            num_experts=shape["num_experts"], num_experts_per_tok=shape["top_k"])
    config._experts_implementation = "grouped_mm"  # what from_pretrained picks by default
    original = Qwen3MoeExperts(config)
    module = original
    words = kind.removesuffix(" 4-bit").split()
    E, F, H = shape["num_experts"], shape["width"], shape["hidden"]
    if words == ["original"] and kind.endswith("4-bit"):  # the original experts, quantized
        module = SharedCoreExperts.empty(original, ModuleSpec("dense", dict.fromkeys(PROJECTIONS, 0)))
    elif words != ["original"]:
        form, rank = words[0], int(words[-1])
        forms = MIXED_FORMS if form == "mixed" else dict.fromkeys(PROJECTIONS, form)
        # a basis gets the width that stores what the wrapper does at `rank` (gate, up and down alike)
        ranks = {p: max_rank(E, F, H, stored_params(E, F, H, rank), "basis") if f == "basis" else rank
                 for p, f in forms.items()}
        module = SharedCoreExperts.empty(original, ModuleSpec(forms, ranks))
    del original
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
        if kind.endswith("4-bit"):
            for proj in module.projections.values():
                for name in proj.TENSORS:
                    proj.quantize_(name, quantized(proj.matrix(name).float(), FORMAT, None))
    return module.eval()


def weights_mib(module: torch.nn.Module) -> float:
    """What the module stores: parameters and buffers (packed codes and scales)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]) / 2**20


def int4_kernel(shape: dict, rows: tuple[int, ...], repeats: int) -> dict:
    """Milliseconds of one expert's down projection ([hidden, width]) on `rows` tokens: torch's int4 weight-only
    kernel for the CPU (groups of 128) against the fp32 matmul of the same matrix; the codes' values do not matter."""
    out_f, in_f = shape["hidden"], shape["width"]
    group = min(FORMAT.group_size, in_f)  # the quick shape's width is 32
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32, generator=g)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_and_zeros = torch.rand(in_f // group, out_f, 2, generator=g) * 0.01
    weight = torch.randn(out_f, in_f, generator=g) * 0.02
    result = {"group": group, "ms": {}}
    for n in rows:
        x = torch.randn(n, in_f, generator=g)
        with torch.no_grad():
            seconds = interleaved_medians({
                "int4": lambda: torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros),
                "fp32": lambda: x @ weight.T}, repeats)
        result["ms"][n] = {kind: 1e3 * value for kind, value in seconds.items()}
    return result


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
    return weights_mib(module), peak_rss_mib()


def run(quick: bool = False) -> dict:
    shape = QUICK if quick else FULL
    kinds = (["original"] + [f"{form} rank {r}" for r in shape["ranks"] for form in shape["forms"]]
             + list(shape["quantized"]))
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
    return {"shape": shape, "rows": rows, "int4_kernel": int4_kernel(shape, shape["tokens"], shape["repeats"])}


def markdown(result: dict) -> str:
    s = result["shape"]
    header = ["tokens", "module", "ms (median)", "tokens/s", "speed-up vs original", "weights MiB", "peak RSS MiB"]
    rows = [[r["tokens"], r["module"], f"{r['ms']:.2f}", f"{r['tokens_per_s']:,.0f}", f"{r['speedup']:.2f}x",
             f"{r['weights_mib']:,.0f}", f"{r['peak_rss_mib']:,.0f}"] for r in result["rows"]]
    return (f"E={s['num_experts']}, top-{s['top_k']}, hidden {s['hidden']}, width {s['width']}, fp32, "
            f"median of {s['repeats']} interleaved runs; `basis rank r` is the shared basis of the width that stores "
            "what the wrapper stores at rank r; `mixed rank r` that basis for gate and up and delta for down; "
            f"`4-bit`: every stored tensor in {FORMAT.bits}-bit groups of {FORMAT.group_size} (round to nearest), "
            "dequantized once a forward, `original 4-bit` the original experts so kept (method=quantize).\n\n"
            + table(header, rows) + "\n\n" + kernel_text(result, s))


def kernel_text(result: dict, shape: dict) -> str:
    """torch's int4 weight-only CPU kernel against fp32 on one expert's down projection."""
    kernel = result.get("int4_kernel")
    if not kernel:
        return ""
    times = "; ".join(f"{n} rows {t['int4']:.2f} ms against {t['fp32']:.2f} ms ({t['fp32'] / t['int4']:.2f}x)"
                      for n, t in kernel["ms"].items())
    return (f"torch's int4 weight-only kernel for the CPU (`_weight_int4pack_mm_for_cpu`, groups of "
            f"{kernel['group']}) on one expert's down projection ({shape['hidden']} x {shape['width']}), against "
            f"the fp32 matmul of the same matrix (speed-up in brackets): {times}.")


if __name__ == "__main__":
    print(markdown(run()))
