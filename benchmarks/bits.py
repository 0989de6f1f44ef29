"""Question 11 (issue 21): held-out loss against bits per expert weight, the compressed forms beside the quantizers.

Both bundled testbeds, loaded in bfloat16, so that every float tensor any method stores counts 16 bits (the bf16
experts are 16 bits per weight). At equal bytes, side by side:
- ours: the calibrated default (method=auto: mixed below kept 0.4, the shared basis from 0.4) at several kept
  fractions, every stored tensor (cores, factors, shared bases) in integers of 2, 3, 4 or 8 bits (asymmetric, groups
  of 128 columns where they divide, one scale per row of the narrow factors; symmetric too at 4 and 8 bits) or in
  bf16;
- ours as a user gets it: CompressionConfig(target_bits=B) at each budget of the table, calibrated, which picks the
  form, kept fraction and bit width itself (among them pure quantization, GPTQ in our metric);
- round to nearest (RTN) and GPTQ of the experts as they are (method=quantize without and with calibration tokens;
  GPTQ sequential, each layer calibrated on the outputs of the quantized layers before it, propagate=compressed, at
  the library's damping and at the literature's 0.01), groups of 128 at 3 and 4 bits (one per row where 128 does not
  divide the input), 32 at 2 bits, symmetric and asymmetric;
- HQQ (its own Quantizer.quantize with its own BaseQuantizeConfig, on each expert matrix; data-free), where the hqq
  package is installed, at the same group sizes and at its default of 64;
- REAP pruning and HC-SMoE merging at a few kept fractions, in bf16: kept x 16 bits.
Bits per weight are measured: what each run stores (codes, scales, zero points at their dtypes; for ours
report.bits_per_weight, which the saved folder holds) over the original expert weights. Calibrated methods read the
same windows of the training split; every model is evaluated in fp32 on the validation split (nats per byte), the
stored values cast exactly, so that bf16 activations add no noise to the comparison; the original is the bf16 weights,
evaluated in fp32 alike.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import plot_to, table
from benchmarks.quality import PEERS, TESTBED_NAMES, calibration_windows, figure_path, replace_experts
from moe_compress import CalibrationConfig, CompressionConfig, compress
from moe_compress.experts import Projection
from moe_compress.testbed import TESTBEDS, heldout_loss, load_testbed, read_split

FULL = dict(testbeds=("testbed", "testbed_fine"), kept=(0.25, 0.3, 0.4, 0.5, 0.75), bits=(2, 3, 4, 8, None),
            symmetric_bits=(4, 8), quantizer_bits=(2, 3, 4), gptq_damps=(1.0, 0.01), hqq_groups=(None, 64),
            peer_kept=(0.25, 0.5, 0.75), target_bits=(1.5, 2, 2.5, 3, 4, 4.25), max_tokens=None,
            calibration_sequences=64)
QUICK = dict(testbeds=("testbed",), kept=(0.3,), bits=(4,), symmetric_bits=(), quantizer_bits=(2,),
             gptq_damps=(1.0,), hqq_groups=(None,), peer_kept=(0.5,), target_bits=(2.5,), max_tokens=2048,
             calibration_sequences=4, reconstruction={"steps": 5})
BUDGETS = (1.5, 2, 2.5, 3, 4, 4.25)
FAMILIES = {"target": "ours, target_bits (the default choice)", "ours": "ours (calibrated default)", "rtn": "RTN",
            "gptq": "GPTQ", "hqq": "HQQ", "reap": "REAP pruning", "hc-smoe": "HC-SMoE merging"}
QUANTIZERS = ("rtn", "gptq", "hqq")
PEER_FAMILIES = (*QUANTIZERS, "reap", "hc-smoe")
FLOAT_BITS = 16  # bf16
WITHIN = 0.02  # nats per byte: "how low does it go within +0.02"
# bits over a budget that still count as within it: compress stores each expert's core index (64 bits per expert and
# projection, 0.002 to 0.008 bits per weight here), even for the experts quantized as they are
SLACK = 0.01


def group_size(bits: int) -> int:
    """The quantizers' group: 32 columns at 2 bits, 128 above (one per row where it does not divide the input)."""
    return 32 if bits == 2 else 128


def in_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """The model computing in fp32, its stored values unchanged (bf16 -> fp32 is exact). model.float() leaves the
    quantized tensors dequantizing to the dtype they were quantized in (bf16), which then meets fp32 activations: each
    one's float dtype is set to fp32 too (the codes and scales stay as stored). torch's own cast: transformers refuses
    .float() on a model loaded from a quantized folder."""
    torch.nn.Module.float(model)
    for module in model.modules():
        if isinstance(module, Projection):
            for name, stored in module.stored.items():
                module.stored[name] = dataclasses.replace(stored, dtype=torch.float32)
    return model


def compressed_run(original, family: str, label: str, config: CompressionConfig, tokens, loss) -> dict:
    """One compress() of a copy of the bf16 original, its bits as measured (what the saved folder would hold)."""
    model = copy.deepcopy(original)
    start = time.perf_counter()
    report = compress(model, config, calibration=tokens, progress=False)
    seconds = time.perf_counter() - start
    return {"family": family, "setting": label, "bits": report.bits_per_weight, "kept": report.kept_fraction,
            "loss": loss(in_fp32(model)), "seconds": seconds}


def format_label(bits: int | None, symmetric: bool, group: int | None = None) -> str:
    if bits is None:
        return "bf16"
    return f"{bits}-bit {'sym' if symmetric else 'asym'}" + ("" if group is None else f" g{group}")


def our_runs(original, setting: dict, calibration, loss) -> list[dict]:
    formats = [(b, False) for b in setting["bits"]] + [(b, True) for b in setting["symmetric_bits"]]
    runs = []
    for kept in setting["kept"]:
        for bits, symmetric in formats:
            config = CompressionConfig(target_ratio=kept, bits=bits, symmetric=symmetric,
                                       reconstruction=setting.get("reconstruction", {}))
            label = f"kept {kept} ({config.for_data(True).method}), {format_label(bits, symmetric)}"
            runs.append(compressed_run(original, "ours", label, config, calibration, loss))
    return runs


def target_runs(original, setting: dict, calibration, loss) -> list[dict]:
    """CompressionConfig(target_bits=B) at each budget, calibrated: what the product picks, form, kept fraction and
    bit width, by itself."""
    runs = []
    for budget in setting["target_bits"]:
        model = copy.deepcopy(original)
        start = time.perf_counter()
        config = CompressionConfig(target_bits=budget, reconstruction=setting.get("reconstruction", {}))
        report = compress(model, config, calibration=calibration, progress=False)
        seconds = time.perf_counter() - start
        runs.append({"family": "target", "budget": budget,
                     "setting": f"target_bits={budget}: {chosen(report.choice['chosen'])}",
                     "bits": report.bits_per_weight, "kept": report.kept_fraction, "loss": loss(in_fp32(model)),
                     "seconds": seconds})
    return runs


def chosen(choice: dict) -> str:
    """What target_bits chose (its report's record), in the words of the other runs' settings."""
    width = format_label(choice["bits"], choice["symmetric"])
    return (f"quantize, {width}" if choice["method"] == "quantize"
            else f"kept {choice['kept']} ({choice['method']}), {width}")


def quantizer_runs(original, setting: dict, calibration, loss) -> list[dict]:
    """RTN, then GPTQ at each damping, of every expert as it is, at each bit width, symmetric and asymmetric."""
    runs = []
    for bits in setting["quantizer_bits"]:
        for symmetric in (True, False):
            label = format_label(bits, symmetric, group_size(bits))
            rtn = CompressionConfig(method="quantize", bits=bits, group_size=group_size(bits), symmetric=symmetric)
            runs.append(compressed_run(original, "rtn", label, rtn, None, loss))
            for damp in setting["gptq_damps"]:
                gptq = CompressionConfig(method="quantize", bits=bits, group_size=group_size(bits), symmetric=symmetric,
                                         calibration=CalibrationConfig(propagate="compressed", damp=damp))
                runs.append(compressed_run(original, "gptq", f"{label}, damp {damp}", gptq, calibration, loss))
    return runs


def hqq_transform(bits: int, group: int, stored_bits: list[int]):
    """W [E, out, in] -> its HQQ dequantized [E, out, in], each expert matrix quantized by HQQ's own Quantizer with
    its own BaseQuantizeConfig (axis 1: groups along the input, as ours; one group per row where `group` exceeds it);
    the bits of what HQQ stores (packed codes; scale and zero in the compute dtype, bf16) appended to `stored_bits`.
    The dequantization runs in fp32 from those stored values."""
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    def transform(W: torch.Tensor) -> torch.Tensor:
        params = BaseQuantizeConfig(nbits=bits, group_size=min(group, W.shape[-1]), axis=1)["weight_quant_params"]
        out = []
        for W_e in W:
            W_q, meta = Quantizer.quantize(W_e, device="cpu", compute_dtype=torch.bfloat16, **params)
            W_q, meta = Quantizer.to_inplace(W_q, {**meta, "compute_dtype": torch.bfloat16}, "cpu")
            stored = [W_q, meta["scale"], meta["zero"]]
            stored_bits.append(sum(8 * t.numel() * t.element_size() for t in stored))
            out.append(Quantizer.dequantize(W_q, {**meta, "compute_dtype": torch.float32}))
        return torch.stack(out)
    return transform


def hqq_runs(original, setting: dict, loss) -> tuple[list[dict], str | None]:
    """HQQ (data-free) at each bit width, at the quantizers' group and at HQQ's default of 64. (runs, None), or
    ([], why not) where the hqq package is not installed."""
    try:
        import hqq  # noqa: F401  (not a dependency of the project: `DISABLE_CUDA=1 pip install hqq`)
    except ImportError as error:
        return [], f"hqq is not installed here ({error}); `DISABLE_CUDA=1 pip install hqq` adds it"
    runs = []
    weights = sum(p.numel() for name, p in original.named_parameters()
                  if ".experts." in name and not name.endswith("bias"))
    for bits in setting["quantizer_bits"]:
        for group in dict.fromkeys(group or group_size(bits) for group in setting["hqq_groups"]):
            stored_bits = []
            start = time.perf_counter()
            model, _ = replace_experts(copy.deepcopy(original).float(), hqq_transform(bits, group, stored_bits))
            seconds = time.perf_counter() - start
            runs.append({"family": "hqq", "setting": f"{bits}-bit g{group}", "bits": sum(stored_bits) / weights,
                         "kept": 1.0, "loss": loss(model), "seconds": seconds})
    return runs, None


def peer_runs(original, setting: dict, calibration, loss) -> list[dict]:
    runs = []
    for kept in setting["peer_kept"]:
        for family, peer in PEERS.items():
            model = copy.deepcopy(original)
            start = time.perf_counter()
            report = peer(model, calibration, kept, progress=False)
            seconds = time.perf_counter() - start
            fraction = report["params_after"] / report["params_before"]
            runs.append({"family": family, "setting": f"kept {kept}, bf16", "bits": fraction * FLOAT_BITS,
                         "kept": fraction, "loss": loss(in_fp32(model)), "seconds": seconds})
    return runs


def run_testbed(name: str, setting: dict) -> dict:
    original, _ = load_testbed(torch.bfloat16, TESTBEDS[name])
    text = read_split("validation")
    loss = lambda model: heldout_loss(model, text, max_tokens=setting["max_tokens"])
    base = loss(in_fp32(copy.deepcopy(original)))
    base_bf16 = loss(original)  # bf16 activations too, for reference
    calibration = calibration_windows(setting["calibration_sequences"])
    hqq, hqq_skipped = hqq_runs(original, setting, loss)
    parts = [quantizer_runs(original, setting, calibration, loss), hqq, peer_runs(original, setting, calibration, loss),
             our_runs(original, setting, calibration, loss), target_runs(original, setting, calibration, loss)]
    runs = [run for part in parts for run in part]
    for run in runs:
        run["increase"] = run["loss"] - base
    print(f"bits: {name}: " + ", ".join(f"{r['family']} {r['setting']} {r['bits']:.2f} b {r['increase']:+.4f}"
                                        for r in runs), file=sys.stderr, flush=True)
    return {"original_loss": base, "original_loss_bf16_activations": base_bf16, "hqq_skipped": hqq_skipped,
            "runs": runs}


def run(quick: bool = False) -> dict:
    setting = QUICK if quick else FULL
    torch.set_num_threads(1)
    return {"setting": setting, "budgets": BUDGETS,
            "testbeds": {name: run_testbed(name, setting) for name in setting["testbeds"]}}


def best_within(runs: list[dict], families, budget: float) -> dict | None:
    """The run of lowest loss increase among `families` that stores at most `budget` bits per weight (+ SLACK); of the
    target_bits runs, the one asked for that budget."""
    fits = [r for r in runs if r["family"] in families and r["bits"] <= budget + SLACK
            and r.get("budget", budget) == budget]
    return min(fits, key=lambda r: r["increase"]) if fits else None


def budget_table(runs: list[dict], budgets) -> str:
    """Per method family, its best run within each budget: the increase, then its bits and setting; lowest in bold."""
    families = [f for f in FAMILIES if any(r["family"] == f for r in runs)]
    best = {b: best_within(runs, families, b) for b in budgets}

    def cell(family: str, budget: float) -> str:
        run = best_within(runs, (family,), budget)
        if run is None:
            return "-"
        text = f"{run['increase']:+.4f}"
        text = f"**{text}**" if run is best[budget] else text
        return f"{text} ({run['bits']:.2f}: {run['setting']})"
    rows = [[FAMILIES[f], *[cell(f, b) for b in budgets]] for f in families]
    return table(["method", *[f"<= {b} bits" for b in budgets]], rows)


def runs_table(runs: list[dict]) -> str:
    rows = [[FAMILIES[r["family"]], r["setting"], f"{r['bits']:.3f}", f"{r['kept']:.3f}",
             f"{r['loss']:.4f}", f"{r['increase']:+.4f}", f"{r['seconds']:.1f}"]
            for r in sorted(runs, key=lambda r: (list(FAMILIES).index(r["family"]), r["bits"]))]
    return table(["method", "setting", "bits per weight", "kept fraction",
                  "held-out loss", "increase", "seconds"], rows)


def frontier(runs: list[dict], family: str) -> list[dict]:
    """The family's runs that no run of fewer bits beats: its curve of loss against bits."""
    points, lowest = [], math.inf
    for run in sorted((r for r in runs if r["family"] == family), key=lambda r: (r["bits"], r["increase"])):
        if run["increase"] < lowest:
            points.append(run)
            lowest = run["increase"]
    return points


def plot(result: dict, path) -> None:
    """Per testbed: loss increase (log scale) against bits per weight; every run a marker, each family's frontier a
    line."""
    for name, found in result["testbeds"].items():
        title = (f"{TESTBED_NAMES[name]}\nbf16 original {found['original_loss']:.4f} nats/byte; lower is better")
        with plot_to(figure_path(path, name), title, "bits per expert weight (every stored tensor, scale and zero)",
                     "held-out loss increase (nats/byte)", title_size=9) as ax:
            for family, label in FAMILIES.items():
                runs = [r for r in found["runs"] if r["family"] == family and r["increase"] > 0]
                if not runs:
                    continue
                line, = ax.plot(*zip(*[(r["bits"], r["increase"]) for r in frontier(runs, family)]), label=label)
                ax.scatter([r["bits"] for r in runs], [r["increase"] for r in runs], color=line.get_color(), s=12,
                           alpha=0.6)
            ax.set_yscale("log")


def short(run: dict) -> str:
    return f"{FAMILIES[run['family']]} {run['increase']:+.4f} ({run['bits']:.2f} bits, {run['setting']})"


def findings(name: str, found: dict, budgets) -> str:
    """Which family is lowest at each budget; ours against the best quantizer within 2, 2.5 and 3 bits (within 2, where
    none stores so few, against the best of their fewest-bits runs); how few bits each family needs to stay within
    +WITHIN."""
    runs = found["runs"]
    lowest = []
    for budget in budgets:
        best = best_within(runs, FAMILIES, budget)
        lowest.append(f"{budget}: {'none' if best is None else FAMILIES[best['family']]}")
    ratios = []
    fewest = min((r["bits"] for r in runs if r["family"] in QUANTIZERS), default=math.inf)
    for budget in (2, 2.5, 3):
        ours, theirs = best_within(runs, ("ours",), budget), best_within(runs, QUANTIZERS, max(budget, fewest))
        if ours and theirs:
            beyond = "" if theirs["bits"] <= budget + SLACK else ", no quantizer run storing this few"
            ratios.append(f"<= {budget} bits {ours['increase'] / theirs['increase']:.2f}x ({short(ours)} against "
                          f"{short(theirs)}{beyond})")
    reach = []
    for family, label in FAMILIES.items():
        fits = [r for r in runs if r["family"] == family and r["increase"] <= WITHIN]
        if any(r["family"] == family for r in runs):
            reach.append(f"{label} {min(r['bits'] for r in fits):.2f}" if fits else f"{label} never")
    return (f"- {TESTBED_NAMES[name]}: lowest within each budget (bits): {'; '.join(lowest)}. Ours' loss increase over "
            f"the best quantizer's (RTN, GPTQ, HQQ): {'; '.join(ratios) or 'no common budget'}. Fewest "
            f"bits per weight within +{WITHIN} nats/byte: {', '.join(reach)}.{target_against_peers(runs)}")


def target_against_peers(runs: list[dict]) -> str:
    """Each target_bits run's increase over the best peer's (quantizers, pruning, merging) within its budget."""
    found = []
    for run in (r for r in runs if r["family"] == "target"):
        budget = run["budget"]
        peer = best_within(runs, PEER_FAMILIES, budget)
        against = "no peer stores this few" if peer is None else \
            f"{run['increase'] / peer['increase']:.2f}x {short(peer)}"
        setting = run["setting"].split(": ")[1]
        found.append(f"{budget} bits: {run['increase']:+.4f} ({run['bits']:.2f} bits, {setting}), {against}")
    return f" target_bits against the best peer within its budget: {'; '.join(found)}." if found else ""


def markdown(result: dict) -> str:
    budgets = result["budgets"]
    sections = []
    for name, found in result["testbeds"].items():
        skipped = f"\n\nHQQ not run: {found['hqq_skipped']}." if found["hqq_skipped"] else ""
        if found.get("hqq_from"):  # rows carried over from an earlier run, which says which
            skipped = f"\n\nThe HQQ rows are {found['hqq_from']}."
        sections.append(
            f"### {TESTBED_NAMES[name]}\n\nOriginal (bf16 weights) held-out loss: **{found['original_loss']:.4f}** "
            f"nats per byte, evaluated in fp32 as every run is ({found['original_loss_bf16_activations']:.4f} with "
            "bf16 activations). Per method, its lowest held-out loss increase among the runs that store at most "
            f"each budget of bits per expert weight (to {SLACK} bits), and that run's measured bits and setting "
            f"(lowest in bold; `-`: no run of the method stores that few):{skipped}\n\n"
            + budget_table(found["runs"], budgets)
            + "\n\n<details><summary>every run: measured bits, kept fraction, loss, time</summary>\n\n"
            + runs_table(found["runs"]) + "\n\n</details>\n\n"
            + f"![{TESTBED_NAMES[name]}]({figure_path(Path('benchmarks/bits.png'), name)})")
    notes = "\n".join(findings(name, found, budgets) for name, found in result["testbeds"].items())
    return "\n\n".join(sections) + "\n\nRead off these tables:\n\n" + notes


if __name__ == "__main__":
    result = run()
    print(markdown(result))
    plot(result, Path("benchmarks/bits.png"))
