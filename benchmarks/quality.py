"""Question 1: quality at equal storage, on both bundled testbeds, against the peers.

The upcycled testbed (8 experts copied from one dense MLP, then trained apart) and the fine-grained one (32 narrow
experts trained from scratch, as Qwen3-MoE, OLMoE, DeepSeek and GPT-OSS are). At each kept fraction of expert
parameters: each method of `compress` (seed `adam` at its specified steps, `als`'s wrapper, `delta`, the shared
`basis`), data-free and, for als, delta and basis, calibrated (fits in the metric of each expert's routed inputs),
all with the default global rank allocation; per-expert truncated SVD at the same storage; and the peers: REAP expert
pruning and HC-SMoE expert merging (moe_compress.baselines), which keep floor(kept * E) experts. Calibrated methods and
peers read the same windows of the training split. Mean-only (every expert = the mean) is one point, at kept 1/E.
The default, method=auto, is basis with calibration data from kept 0.4 on, delta otherwise. Figures: held-out loss in
nats per byte on the validation split and its increase over the original, relative reconstruction error of the expert
weights where a method has one, fit time (median).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import plot_to, table
from moe_compress import CompressionConfig, compress, find_experts, merge_experts, prune_experts
from moe_compress.compression.config import RECONSTRUCTION_STEPS, CalibrationConfig, ReconstructionConfig
from moe_compress.discovery import join_weights, split_weights
from moe_compress.testbed import TESTBEDS, heldout_loss, load_testbed, read_split

TESTBED_NAMES = {"testbed": "upcycled testbed (8 experts of width 256, top-2)",
                 "testbed_fine": "fine-grained testbed, trained from scratch (32 experts of width 64, top-4)"}
# variants: the default's reconstruction with other settings, at the kept fractions of variant_ratios
VARIANTS = {"weighting=uniform (the default of 2026-12-03)": {"reconstruction": {"weighting": "uniform"}},
            "propagate=compressed": {"calibration": {"propagate": "compressed"}},
            "router": {"reconstruction": {"router": True}},
            "objective=normed": {"reconstruction": {"objective": "normed"}},
            "propagate=compressed, router, 300 steps": {"calibration": {"propagate": "compressed"},
                                                        "reconstruction": {"router": True, "steps": 300}}}
FULL = dict(ratios=(0.2, 0.25, 0.3, 0.5, 0.75), methods=("adam", "als", "delta", "basis"),
            calibrated=("als", "delta", "basis", "mixed"), repeats=1, adam_repeats=1, default_repeats=1,
            max_tokens=None, calibration_sequences=CalibrationConfig().num_sequences, variants=VARIANTS,
            variant_ratios=(0.3, 0.5), testbeds=tuple(TESTBED_NAMES))
# the smoke run on one testbed: the other runs the same code on other data (test suite time)
QUICK = dict(testbeds=("testbed_fine",), ratios=(0.3,), methods=("als", "delta", "basis"), calibrated=("mixed",),
             repeats=1, adam_repeats=1, default_repeats=1, max_tokens=4096, calibration_sequences=4, adam_steps=5,
             polish_steps=5, reconstruction_steps=5, variants={"router": VARIANTS["router"]}, variant_ratios=(0.3,))
CALIBRATION_LEN = 256
PEERS = {"reap": prune_experts, "hc-smoe": merge_experts}
LABELS = {"adam": "seed adam", "als": "als (wrapper)", "delta": "delta (C + U_e V_e^T; the default data-free)",
          "basis": "basis (C + U_e V^T)", "reap": "REAP pruning", "hc-smoe": "HC-SMoE merging",
          "als+calibration": "als (wrapper), calibrated",
          "delta+calibration": "delta, calibrated",
          "mixed+calibration": "mixed (basis for gate, up; delta for down), calibrated",
          "basis+calibration": "basis, calibrated",
          "auto+calibration": "the default: mixed below kept 0.4, basis from it, each reconstructed (loss-weighted)"}
# the default with calibration data before reconstruction (BENCHMARKS.md of 2026-11-26: closed-form fits of 3 rounds,
# on 64 calibration windows), which issue 22's goals are stated against
BEFORE_RECONSTRUCTION = {"testbed": {0.2: 0.0283, 0.25: 0.0201, 0.3: 0.0153, 0.5: 0.0044, 0.75: 0.0012},
                         "testbed_fine": {0.2: 0.5016, 0.25: 0.3321, 0.3: 0.2092, 0.5: 0.0223, 0.75: 0.0034}}


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


def calibration_windows(count: int) -> torch.Tensor:
    """`count` windows of CALIBRATION_LEN bytes spread evenly over the training split (the token ids of a byte-level
    model): data the held-out loss never reads."""
    ids = torch.tensor(list(read_split("train").encode("utf-8")))
    starts = torch.linspace(0, len(ids) - CALIBRATION_LEN - 1, count).long()
    return torch.stack([ids[s:s + CALIBRATION_LEN] for s in starts.tolist()])


def timed_median(fn, repeats: int) -> tuple[object, float]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def compress_row(original, config: CompressionConfig, tokens, repeats: int, loss) -> dict:
    def fit():
        model = copy.deepcopy(original)
        return model, compress(model, config, calibration=tokens, progress=False)
    (model, report), seconds = timed_median(fit, repeats)
    block = report.block_error
    return {"ratio": report.kept_fraction, "rel_error": report.rel_error, "loss": loss(model), "seconds": seconds,
            "block_error": None if block is None else list(block)}


def default_config(ratio: float, setting: dict, **extra) -> CompressionConfig:
    """The default compression at `ratio` (method=auto, calibrated: with reconstruction), with `extra` settings."""
    steps = {"steps": setting["reconstruction_steps"]} if "reconstruction_steps" in setting else {}
    extra = {**extra, "reconstruction": {**steps, **extra.get("reconstruction", {})}}
    return CompressionConfig(target_ratio=ratio, **extra)


def compress_rows(original, ratio: float, setting: dict, calibration: torch.Tensor, loss) -> list[dict]:
    """Each method data-free, then the calibrated ones (closed-form fits alone), then the default (with
    reconstruction); a calibrated fit's time includes its calibration pass."""
    rows = []
    runs = [(m, None) for m in setting["methods"]] + [(m, calibration) for m in setting["calibrated"]]
    for method, tokens in runs:
        extra = {k: setting[k] for k in ("adam_steps", "polish_steps") if k in setting}
        config = CompressionConfig(target_ratio=ratio, method=method, **extra)
        repeats = setting["adam_repeats"] if method == "adam" else setting["repeats"]
        rows.append({"method": method if tokens is None else f"{method}+calibration",
                     **compress_row(original, config, tokens, repeats, loss)})
    rows.append({"method": "auto+calibration", **compress_row(original, default_config(ratio, setting), calibration,
                                                               setting["default_repeats"], loss)})
    return rows


def variant_rows(original, ratio: float, setting: dict, calibration: torch.Tensor, loss) -> list[dict]:
    """The default with each of setting["variants"]' other reconstruction settings."""
    return [{"method": "auto+calibration", "variant": name,
             **compress_row(original, default_config(ratio, setting, **extra), calibration, 1, loss)}
            for name, extra in setting["variants"].items()]


def peer_rows(original, ratio: float, calibration: torch.Tensor, loss) -> list[dict]:
    rows = []
    top_k = original.config.num_experts_per_tok
    for method, peer in PEERS.items():
        if int(ratio * original.config.num_experts + 1e-9) < top_k:
            continue  # fewer experts than each token is routed to: the peer cannot keep to this budget
        model = copy.deepcopy(original)
        start = time.perf_counter()
        report = peer(model, calibration, ratio, progress=False)
        seconds = time.perf_counter() - start
        rows.append({"method": method, "ratio": report["params_after"] / report["params_before"], "rel_error": None,
                     "loss": loss(model), "seconds": seconds})
    return rows


def testbed_setting(name: str, setting: dict):
    """(original model, held-out loss function, original's loss, calibration windows) of a bundled testbed."""
    original, _ = load_testbed(torch.float32, TESTBEDS[name])
    text = read_split("validation")
    loss = lambda model: heldout_loss(model, text, max_tokens=setting["max_tokens"])
    return original, loss, loss(original), calibration_windows(setting["calibration_sequences"])


def run_testbed(name: str, setting: dict) -> dict:
    original, loss, base, calibration = testbed_setting(name, setting)
    mean_model, mean_error = replace_experts(original, mean_only)
    rows = [{"method": "mean only", "target": None, "ratio": 1 / original.config.num_experts,
             "rel_error": mean_error, "loss": loss(mean_model), "seconds": 0.0}]
    variants = []
    for ratio in setting["ratios"]:
        svd_model, svd_error = replace_experts(original, per_expert_svd(ratio))
        found = [{"method": "per-expert SVD", "ratio": ratio, "rel_error": svd_error, "loss": loss(svd_model),
                  "seconds": 0.0}]
        found += compress_rows(original, ratio, setting, calibration, loss)
        found += peer_rows(original, ratio, calibration, loss)
        if ratio in setting["variant_ratios"]:
            variants += [{**row, "target": ratio} for row in variant_rows(original, ratio, setting, calibration, loss)]
        rows += [{**row, "target": ratio} for row in found]
        print(f"quality: {name} kept {ratio}: " + ", ".join(f"{r['method']} {r['loss'] - base:+.4f}" for r in found),
              file=sys.stderr, flush=True)
    for row in rows + variants:
        row["increase"] = row["loss"] - base
    return {"original_loss": base, "rows": rows, "variants": variants}


def run(quick: bool = False) -> dict:
    setting = QUICK if quick else FULL
    return {"setting": setting, "testbeds": {name: run_testbed(name, setting) for name in setting["testbeds"]}}


def methods_of(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows if r["target"] is not None))


def best_by_column(rows: list[dict], ratios, allowed=lambda method: True) -> dict[float, str]:
    return {ratio: min((r for r in rows if r["target"] == ratio and allowed(r["method"])),
                       key=lambda r: r["increase"])["method"] for ratio in ratios}


def figure_path(path: Path, name: str) -> Path:
    return path if name == "testbed" else path.with_name(f"{path.stem}_{name.removeprefix('testbed_')}.png")


def plot(result: dict, path) -> None:
    """Per testbed: loss increase against kept fraction, log scale (the methods differ by orders of magnitude)."""
    for name, found in result["testbeds"].items():
        title = f"{TESTBED_NAMES[name]}\noriginal {found['original_loss']:.4f} nats/byte; lower is better"
        with plot_to(figure_path(path, name), title, "kept fraction of expert parameters",
                     "held-out loss increase over the original (nats/byte)", title_size=9) as ax:
            for method in methods_of(found["rows"]):
                points = sorted((r["ratio"], r["increase"]) for r in found["rows"] if r["method"] == method)
                ax.plot(*zip(*points), marker="o", label=LABELS.get(method, method))
            mean = next(r for r in found["rows"] if r["method"] == "mean only")
            ax.scatter([mean["ratio"]], [mean["increase"]], marker="x", color="black", label="mean only", zorder=3)
            ax.set_yscale("log")


def increase_table(found: dict, ratios) -> str:
    best = best_by_column(found["rows"], ratios)
    cells = {(r["method"], r["target"]): r for r in found["rows"]}

    def cell(method: str, ratio: float) -> str:
        row = cells.get((method, ratio))
        if row is None:
            return "-"
        text = f"{row['increase']:+.4f}"
        return f"**{text}**" if best[ratio] == method else text
    rows = [[LABELS.get(m, m), *[cell(m, ratio) for ratio in ratios]] for m in methods_of(found["rows"])]
    return table(["method", *[f"kept {ratio}" for ratio in ratios]], rows)


def details_table(found: dict) -> str:
    rows = [[LABELS.get(r["method"], r["method"]), f"{r['ratio']:.3f}",
             "-" if r["rel_error"] is None else f"{r['rel_error']:.4f}", f"{r['loss']:.4f}", f"{r['increase']:+.4f}",
             f"{r['seconds']:.2f}" if r["seconds"] else "-"] for r in found["rows"]]
    return table(["method", "kept fraction", "rel. error", "held-out loss", "increase", "fit s (one run)"], rows)


def spans(best: dict[float, str]) -> str:
    """'A at kept 0.2-0.3; B at kept 0.5-0.75': consecutive sizes with the same winner joined."""
    joined: list[tuple[str, list[float]]] = []
    for ratio, method in best.items():
        if joined and joined[-1][0] == method:
            joined[-1][1].append(ratio)
        else:
            joined.append((method, [ratio]))
    return "; ".join(f"{LABELS.get(m, m)} at kept {'-'.join(map(str, sorted({rs[0], rs[-1]})))}" for m, rs in joined)


def advice(result: dict) -> str:
    """Which method to pick at which size, read off the tables: with calibration data, without it, and where the
    peers stand."""
    ratios = result["setting"]["ratios"]
    lines = []
    for name, found in result["testbeds"].items():
        by = {(r["method"], r["target"]): r for r in found["rows"]}
        best = best_by_column(found["rows"], ratios)
        data_free = best_by_column(found["rows"], ratios, lambda m: "calibration" not in m and m not in PEERS)
        peers = [min(by[(p, t)]["increase"] for p in PEERS if (p, t) in by) / by[(best[t], t)]["increase"]
                 for t in ratios if any((p, t) in by for p in PEERS)]
        lines.append(f"- {TESTBED_NAMES[name]}: lowest of all, {spans(best)}. Without calibration data, "
                     f"{spans(data_free)}. The better peer loses {min(peers):.1f}x to {max(peers):.1f}x as much as "
                     "the best method.")
    return ("Which method to pick at which size, read off these tables (`compress` keeps a little less than each "
            "column's fraction, its ranks being whole numbers; the details give every kept fraction):\n\n"
            + "\n".join(lines))


def delta_note(result: dict) -> str:
    """What the additive baseline against the wrapper means, with this run's outcome on each testbed."""
    counts = []
    for name, found in result["testbeds"].items():
        by = {(r["method"], r["target"]): r for r in found["rows"]}
        pairs = [(by[("als", t)], r) for (m, t), r in by.items() if m == "delta" and ("als", t) in by]
        errors = sum(d["rel_error"] <= a["rel_error"] for a, d in pairs)
        losses = sum(d["increase"] <= a["increase"] for a, d in pairs)
        counts.append(f"on the {TESTBED_NAMES[name].split(' (')[0].split(',')[0]} the lower error at {errors} and "
                      f"the lower loss increase at {losses} of {len(pairs)} kept fractions")
    return ("The additive `delta` form stores exactly what the wrapper stores (2r(out + in) per expert and the core) "
            "and can represent every wrapper, since (I + A B^T) C (I + P Q^T) - C has rank at most 2r: at equal "
            "storage its best fit can only match or beat the wrapper's in reconstruction error. In this run it has "
            + ", and ".join(counts) + ".")


def calibration_note(result: dict) -> str:
    """The calibrated fits against the data-free ones and against the peers, per testbed and kept fraction."""
    lines = []
    for name, found in result["testbeds"].items():
        by = {(r["method"], r["target"]): r for r in found["rows"]}
        parts = []
        for method in result["setting"]["calibrated"]:
            ratios = [t for t in result["setting"]["ratios"] if (f"{method}+calibration", t) in by]
            free = method if (method, ratios[0]) in by else "delta"  # mixed is not run data-free: against delta
            factors = ", ".join(f"{by[(f'{method}+calibration', t)]['increase'] / by[(free, t)]['increase']:.2f}x "
                                f"at {t}" for t in ratios)
            beaten = [t for t in ratios if all(by[(f"{method}+calibration", t)]["increase"] < by[(p, t)]["increase"]
                                               for p in PEERS if (p, t) in by)]
            parts.append(f"{LABELS[method + '+calibration']}: {factors} the data-free {free}'s loss increase; below "
                         f"both peers at kept {', '.join(map(str, beaten)) or 'none'}")
        lines.append(f"- {TESTBED_NAMES[name]}: " + "; ".join(parts) + ".")
    return "Calibration, read off these tables:\n\n" + "\n".join(lines)


def default_note(result: dict) -> str:
    """The default (method=auto) with calibration data against the default without, per testbed and kept fraction."""
    lines = []
    for name, found in result["testbeds"].items():
        by = {(r["method"], r["target"]): r for r in found["rows"]}
        cells = [f"{by[('auto+calibration', t)]['increase'] / by[('delta', t)]['increase']:.2f}x at {t}"
                 for t in result["setting"]["ratios"] if ("auto+calibration", t) in by and ("delta", t) in by]
        lines.append(f"- {TESTBED_NAMES[name]}: " + ", ".join(cells))
    return ("The default (`method=auto`) with calibration data, against the default without it (`delta`), in loss "
            "increase:\n\n" + "\n".join(lines))


def reconstruction_note(result: dict) -> str:
    """The default with reconstruction against the closed-form fits of its form and against the default before
    reconstruction (BEFORE_RECONSTRUCTION); then the reconstruction's other settings (variants)."""
    lines, variant_rows_ = [], []
    for name, found in result["testbeds"].items():
        by = {(r["method"], r["target"]): r for r in found["rows"]}
        cells = []
        for t in result["setting"]["ratios"]:
            if ("auto+calibration", t) not in by:
                continue
            default = by[("auto+calibration", t)]
            closed = by.get((f"{CompressionConfig(target_ratio=t).for_data(True).method}+calibration", t))
            before = BEFORE_RECONSTRUCTION[name].get(t)
            block = default["block_error"]
            text = f"kept {t}: {default['increase']:+.4f}"
            text += "" if closed is None else f" against {closed['increase']:+.4f} for its closed-form fit alone"
            text += "" if before is None else f" ({default['increase'] / before:.2f}x the {before:+.4f} of before)"
            text += "" if block is None else f", block output error {block[0]:.3f} -> {block[1]:.3f}"
            cells.append(text)
        lines.append(f"- {TESTBED_NAMES[name]}: " + "; ".join(cells) + ".")
        for row in found.get("variants", []):
            default = by.get(("auto+calibration", row["target"]))
            versus = "-" if default is None else f"{row['increase'] / default['increase']:.2f}x"
            variant_rows_.append([TESTBED_NAMES[name].split(" (")[0], row["target"], row["variant"],
                                  f"{row['increase']:+.4f}", versus,
                                  "-" if row["block_error"] is None else f"{row['block_error'][1]:.3f}"])
    defaults = ReconstructionConfig()
    text = (f"Layer-wise reconstruction (the default with calibration data: {RECONSTRUCTION_STEPS} Adam steps a "
            "block on its output, each token's squared error weighted by the norm of the original model's loss "
            f"gradient there, lr {defaults.lr:g}, {defaults.batch_tokens} tokens a step out of the first "
            f"{defaults.max_tokens} that reach it; compression/reconstruction.py, calibration/sensitivity.py), "
            "against the closed-form fits it starts from and against the default before it (closed-form fits of 3 "
            "rounds on 64 calibration windows, "
            f"BENCHMARKS.md of 2026-11-26; this run calibrates on {result['setting']['calibration_sequences']} "
            "windows, the product's default number of calibration sequences):\n\n" + "\n".join(lines))
    if variant_rows_:
        rerun = result.get("variants_meta")
        rerun = "" if rerun is None else f"; `{rerun['command']}`, {rerun['date']}"
        text += ("\n\nThe reconstruction's other settings, each against the default at the same kept fraction (one "
                 f"run each{rerun}):\n\n" + table(["testbed", "kept", "setting", "increase", "against the default",
                                           "block error after"], variant_rows_))
    return text


def markdown(result: dict) -> str:
    ratios = result["setting"]["ratios"]
    sections = []
    for name, found in result["testbeds"].items():
        mean = next(r for r in found["rows"] if r["method"] == "mean only")
        figure = figure_path(Path("benchmarks/quality.png"), name)
        sections.append(
            f"### {TESTBED_NAMES[name]}\n\nOriginal held-out loss: **{found['original_loss']:.4f}** nats per byte "
            "(validation split). Held-out loss increase over the original at each kept fraction of expert "
            "parameters (best in bold; `-`: the peer cannot keep fewer experts than each token is routed to):\n\n"
            + increase_table(found, ratios)
            + f"\n\nMean only (every expert = the mean; kept {mean['ratio']:.3f}): {mean['increase']:+.4f}.\n\n"
            + "<details><summary>every run: kept fraction, error, loss, fit time</summary>\n\n"
            + details_table(found) + f"\n\n</details>\n\n![{TESTBED_NAMES[name]}]({figure})")
    return "\n\n".join(sections) + "\n\n" + "\n\n".join([advice(result), reconstruction_note(result),
                                                            default_note(result), calibration_note(result),
                                                            delta_note(result)])


def variants_part() -> None:
    """The variants alone (`--variants`), rerun into the stored results: each testbed's list replaced."""
    path = Path(__file__).parent / "results" / "quality.json"
    result = json.loads(path.read_text())
    for name, found in result["testbeds"].items():
        original, loss, base, calibration = testbed_setting(name, FULL)
        found["variants"] = [{**row, "target": ratio, "increase": row["loss"] - base}
                             for ratio in FULL["variant_ratios"]
                             for row in variant_rows(original, ratio, FULL, calibration, loss)]
    result["variants_meta"] = {"command": "python -m benchmarks.quality --variants", "date": time.strftime("%Y-%m-%d")}
    path.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    if "--variants" in sys.argv:
        variants_part()
    else:
        result = run()
        print(markdown(result))
        plot(result, Path("benchmarks/quality.png"))
