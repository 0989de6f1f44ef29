"""Question 3: is the compressed experts module faster than the original one?

The original is transformers' Qwen3MoeExperts with its default experts implementation (grouped_mm), the compressed one
SharedCoreExperts in each form at the storage of wrapper ranks 16 and 64 (delta at the same rank; the shared basis at
the width k that stores as much; mixed: that basis for gate and up, delta for down), all fp32 with random weights
(speed does not depend on the values), at Qwen3-30B-A3B shapes: E=128 experts, top-8, hidden 2048, expert width 768.
Quantized rows (`4-bit`): every stored tensor in 4-bit groups of 128 (round to nearest), as compress(bits=4) keeps
them; `original 4-bit` is the original experts so kept (method=quantize, kept 1.0), the weight-only int4 quantization
of the original. A forward dequantizes what it reads (the per-expert tensors of the routed experts alone), except a
single 4-bit core on fewer than INT4_KERNEL_ROWS bf16 tokens (on any number where the CPU has no native bf16 matmul:
quantize.int4_kernel_rows), which runs through torch's int4 weight-only kernel; the
`, bf16` rows are the same modules in bf16, as models are served; `, packed` ones laid out for the CPU as the vLLM
plugin lays them out (moe_compress.pack_for_cpu: the shared float tensors in oneDNN's layout, the per-expert ones as
embedding_bag's tables, the 4-bit ones in the int4 kernel's, every product through it, in the codes' stead). The
kernel is timed apart on one expert's projections (`int4_kernel`): against dequantizing the matrix and a bf16 matmul,
and against the float matmuls.
Timing: medians of interleaved runs in one process.
Memory: peak resident memory of a fresh process that builds one module and runs one forward.
"""

from __future__ import annotations

import math

import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from benchmarks.common import in_fresh_process, interleaved_medians, peak_rss_mib, table
from moe_compress import ModuleSpec, SharedCoreExperts, pack_for_cpu
from moe_compress.cpu_matmul import ExpertTables, PackedMatrices
from moe_compress.compression.budget import max_rank, stored_params
from moe_compress.compression.config import MIXED_FORMS, PROJECTIONS
from moe_compress.compression.fitting import quantized
from moe_compress.quantize import (INT4_KERNEL_ROWS, Int4Matrices, Int4Weight, QuantFormat, dequantize_packed,
                                   int4_kernel_rows, pack, quantize_rtn)

FULL = dict(num_experts=128, top_k=8, hidden=2048, width=768, tokens=(1, 64, 512), ranks=(16, 64), repeats=7,
            forms=("wrapped", "delta", "basis", "mixed"), quantized=("original 4-bit", "mixed rank 16 4-bit"),
            bf16=("original", "mixed rank 16", "original 4-bit", "mixed rank 16 4-bit", "mixed rank 16, packed",
                  "original 4-bit, packed", "mixed rank 16 4-bit, packed"),
            kernel_rows=(1, 8, 64, 128, 512))
QUICK = dict(num_experts=8, top_k=2, hidden=64, width=32, tokens=(16,), ranks=(4,), repeats=2, forms=("mixed",),
             quantized=("original 4-bit", "mixed rank 4 4-bit"),
             bf16=("original", "mixed rank 4 4-bit", "mixed rank 4 4-bit, packed"),
             kernel_rows=(1, 16))
BF16 = ", bf16"
PACKED = ", packed"
FORMAT = QuantFormat(4, 128)


def build(kind: str, shape: dict) -> torch.nn.Module:
    """A module of `kind`: "original", "<form> rank <r>", either followed by " 4-bit" for FORMAT storage, then by
    PACKED for one packed for the CPU, then by BF16 for a bf16 module."""
    dtype = torch.bfloat16 if kind.endswith(BF16) else torch.float32
    kind = kind.removesuffix(BF16)
    if kind.endswith(PACKED):
        return pack_for_cpu(build(kind.removesuffix(PACKED) + (BF16 if dtype == torch.bfloat16 else ""), shape))
    config = Qwen3MoeConfig(hidden_size=shape["hidden"], moe_intermediate_size=shape["width"],
                            num_experts=shape["num_experts"], num_experts_per_tok=shape["top_k"])
    config._experts_implementation = "grouped_mm"  # what from_pretrained picks by default
    original = Qwen3MoeExperts(config).to(dtype)
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
                    scale_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16  # as compress does
                    proj.quantize_(name, quantized(proj.matrix(name).to(scale_dtype), FORMAT, None))
    return module.eval()


def weights_mib(module: torch.nn.Module) -> float:
    """What the module holds for its weights, each storage once: parameters and buffers (packed codes and scales;
    one-element placeholders where packed), the 4-bit tensors a forward laid out for torch's int4 kernel, and the
    packed layouts (embedding_bag's tables; oneDNN's opaque ones counted by their elements)."""
    layouts = [built for m in module.modules() for _, built in getattr(m, "_kernels", {}).values() if built]
    layouts += [packed for m in module.modules() for _, packed in getattr(m, "_packed", {}).values()]
    opaque = sum(layout.nbytes for layout in layouts if isinstance(layout, PackedMatrices))
    tensors = [*module.parameters(), *module.buffers(),
               *(layout.tables for layout in layouts if isinstance(layout, ExpertTables)),
               *(t for layout in layouts if isinstance(layout, Int4Matrices) for k in layout.weights
                 for t in (k.packed, k.scales_and_zeros, k.row_shift) if t is not None)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return (sum(storages.values()) + opaque) / 2**20


def int4_kernel(shape: dict, rows: tuple[int, ...], repeats: int) -> dict:
    """Milliseconds of one expert's up ([width, hidden]) and down ([hidden, width]) projections on `rows` tokens:
    torch's int4 weight-only kernel (bf16 tokens; fp32 tokens take a slow path), dequantizing the 4-bit matrix and a
    bf16 matmul (what a forward does otherwise), and the bf16 and fp32 matmuls of the float matrix."""
    group = min(FORMAT.group_size, shape["width"])  # the quick shape's width is 32
    format = QuantFormat(FORMAT.bits, group, symmetric=False)
    result = {"group": group, "ms": {}}
    for name, (out_f, in_f) in {"up": (shape["width"], shape["hidden"]),
                                "down": (shape["hidden"], shape["width"])}.items():
        weight = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) * 0.02
        q = quantize_rtn(weight.bfloat16(), format)
        packed = pack(q.codes, format.bits)
        kernel = Int4Weight.of(packed, in_f, q.scales, q.zeros, format)
        bf16 = weight.bfloat16()
        for n in rows:
            x = torch.randn(n, in_f, generator=torch.Generator().manual_seed(n))
            xb = x.bfloat16()
            with torch.no_grad():
                seconds = interleaved_medians({
                    "int4 kernel": lambda: kernel(xb),
                    "dequantize + bf16": lambda: xb @ dequantize_packed(packed, in_f, q.scales, q.zeros, format).T,
                    "bf16": lambda: xb @ bf16.T, "fp32": lambda: x @ weight.T}, repeats)
            result["ms"][f"{name} {n}"] = {kind: 1e3 * value for kind, value in seconds.items()}
    return result


def routing(tokens: int, shape: dict, kind: str = "", seed: int = 0):
    """A forward's inputs for a module of `kind`: tokens, their experts and routing weights (bf16 for a bf16 one)."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if kind.endswith(BF16) else torch.float32
    x = torch.randn(tokens, shape["hidden"], generator=g).to(dtype)
    index = torch.stack([torch.randperm(shape["num_experts"], generator=g)[: shape["top_k"]] for _ in range(tokens)])
    return x, index, torch.softmax(torch.randn(tokens, shape["top_k"], generator=g), -1).to(dtype)


def peak_memory(kind: str, tokens: int, shape: dict) -> tuple[float, float]:
    """(weights MiB, peak resident MiB) of building one module and running one forward; run it in a fresh process."""
    module = build(kind, shape)
    with torch.no_grad():
        module(*routing(tokens, shape, kind))
    return weights_mib(module), peak_rss_mib()


def run(quick: bool = False) -> dict:
    shape = QUICK if quick else FULL
    kinds = (["original"] + [f"{form} rank {r}" for r in shape["ranks"] for form in shape["forms"]]
             + list(shape["quantized"]) + [kind + BF16 for kind in shape["bf16"]])
    modules = {kind: build(kind, shape) for kind in kinds}
    rows = []
    for tokens in shape["tokens"]:
        inputs = {kind: routing(tokens, shape, kind) for kind in kinds}
        with torch.no_grad():
            seconds = interleaved_medians({k: (lambda m=m, k=k: m(*inputs[k])) for k, m in modules.items()},
                                          shape["repeats"])
        for kind in kinds:
            weights, peak = in_fresh_process(peak_memory, kind, tokens, shape)
            original = "original" + (BF16 if kind.endswith(BF16) else "")
            rows.append({"tokens": tokens, "module": kind, "tokens_per_s": tokens / seconds[kind],
                         "ms": 1e3 * seconds[kind], "speedup": seconds[original] / seconds[kind],
                         "weights_mib": weights, "peak_rss_mib": peak})
    return {"shape": shape, "rows": rows, "int4_kernel": int4_kernel(shape, shape["kernel_rows"], shape["repeats"]),
            "int4_kernel_rows": int4_kernel_rows("cpu")}  # this machine's: infinite without native bf16 matmuls


def markdown(result: dict) -> str:
    s = result["shape"]
    header = ["tokens", "module", "ms (median)", "tokens/s", "speed-up vs original", "weights MiB", "peak RSS MiB"]
    rows = [[r["tokens"], r["module"], f"{r['ms']:.2f}", f"{r['tokens_per_s']:,.0f}", f"{r['speedup']:.2f}x",
             f"{r['weights_mib']:,.0f}", f"{r['peak_rss_mib']:,.0f}"] for r in result["rows"]]
    return (f"E={s['num_experts']}, top-{s['top_k']}, hidden {s['hidden']}, width {s['width']}, fp32 (`, bf16`: the "
            f"module and its tokens in bf16, against the original in bf16), median of {s['repeats']} interleaved "
            "runs; `basis rank r` is the shared basis of the width that stores what the wrapper stores at rank r; "
            f"`mixed rank r` that basis for gate and up and delta for down; `4-bit`: every stored tensor in "
            f"{FORMAT.bits}-bit groups of {FORMAT.group_size} (round to nearest), dequantized where a forward reads "
            "it (the routed experts' alone), except the tensors the experts share (single cores, shared bases) on "
            f"{kernel_tokens(result.get('int4_kernel_rows', INT4_KERNEL_ROWS))} bf16 tokens, which run through "
            "torch's int4 kernel; `original 4-bit` the "
            "original experts so kept (method=quantize); `, packed`: laid out as the vLLM plugin serves them "
            "(pack_for_cpu: shared floats for oneDNN, per-expert ones as embedding_bag tables, every 4-bit product "
            "through the int4 kernel, codes freed).\n\n"
            + table(header, rows) + "\n\n" + kernel_text(result, s))


def kernel_tokens(rows: float) -> str:
    """The bf16 token counts on which a forward of the unpacked module runs the shared 4-bit tensors through the
    kernel."""
    return f"fewer than {rows:.0f}" if math.isfinite(rows) else "any number of (this CPU has no native bf16 matmul)"


def kernel_text(result: dict, shape: dict) -> str:
    """torch's int4 weight-only CPU kernel against dequantizing and the float matmuls, on one expert's projections."""
    kernel = result.get("int4_kernel")
    if not kernel or "up 1" not in kernel["ms"]:
        return ""
    kinds = list(next(iter(kernel["ms"].values())))
    rows = [[label.split()[0], label.split()[1], *(f"{t[k]:.3f}" for k in kinds)] for label, t in kernel["ms"].items()]
    return (f"torch's int4 weight-only kernel for the CPU (`_weight_int4pack_mm_for_cpu`, asymmetric groups of "
            f"{kernel['group']}, bf16 tokens) on one expert's up ({shape['width']} x {shape['hidden']}) and down "
            f"({shape['hidden']} x {shape['width']}) projections, milliseconds (median):\n\n"
            + table(["matrix", "tokens", *kinds], rows))


if __name__ == "__main__":
    print(markdown(run()))
