"""Question 9: where should the parameter budget go? Rank allocation, several cores, and the shared-basis form.

On both bundled testbeds at kept 0.3 and 0.5 of the expert parameters, calibrated on the windows of §1 (and a few
data-free rows for reference): each form (als's wrapper, delta, basis) with uniform ranks and with the global
allocation, and delta with 2 and 4 cores (k-means groups). Held-out loss increase over the original on the
validation split, the kept fraction each run really stores (integer ranks leave some of the budget unspent), the
weight-space relative error and the fit time (one run each: the fits are deterministic).
"""

from __future__ import annotations

import copy
import sys
import time

from benchmarks.common import table
from benchmarks.quality import TESTBED_NAMES, testbed_setting
from moe_compress import CompressionConfig, compress
from moe_compress.compress import RankTooLargeError

RUNS = [  # (method, rank allocation, cores, calibrated)
    ("als", "uniform", 1, True), ("als", "global", 1, True),
    ("delta", "uniform", 1, True), ("delta", "global", 1, True),
    ("basis", "uniform", 1, True), ("basis", "global", 1, True),
    ("delta", "global", 2, True), ("delta", "global", 4, True),
    ("als", "uniform", 1, False), ("als", "global", 1, False),
    ("delta", "uniform", 1, False), ("delta", "global", 1, False),
    ("basis", "uniform", 1, False), ("basis", "global", 1, False),
]
FULL = dict(ratios=(0.3, 0.5), runs=RUNS, calibration_sequences=64, max_tokens=None)
QUICK = dict(ratios=(0.3,), runs=[("delta", "global", 1, True), ("basis", "uniform", 1, False),
                                  ("delta", "uniform", 2, False)], calibration_sequences=4, max_tokens=4096)


def label(method: str, allocation: str, cores: int, calibrated: bool) -> str:
    return f"{method}, {allocation}{f', {cores} cores' if cores > 1 else ''}{'' if calibrated else ', data-free'}"


def run_testbed(name: str, setting: dict) -> dict:
    original, loss, base, calibration = testbed_setting(name, setting)
    rows = []
    for ratio in setting["ratios"]:
        for method, allocation, cores, calibrated in setting["runs"]:
            model = copy.deepcopy(original)
            config = CompressionConfig(target_ratio=ratio, method=method, rank_allocation=allocation, num_cores=cores)
            start = time.perf_counter()
            try:
                report = compress(model, config, calibration=calibration if calibrated else None, progress=False)
            except RankTooLargeError:  # several cores alone can take more than the budget
                print(f"budget: {name} {ratio} {label(method, allocation, cores, calibrated)}: does not fit",
                      file=sys.stderr, flush=True)
                continue
            seconds = time.perf_counter() - start
            rows.append({"target": ratio, "run": label(method, allocation, cores, calibrated),
                         "kept": report.kept_fraction, "rel_error": report.rel_error, "increase": loss(model) - base,
                         "seconds": seconds, "ranks": [r.rank for r in report.rows]})
            print(f"budget: {name} {ratio} {rows[-1]['run']}: {rows[-1]['increase']:+.4f}", file=sys.stderr,
                  flush=True)
    return {"original_loss": base, "rows": rows}


def run(quick: bool = False) -> dict:
    setting = QUICK if quick else FULL
    return {"setting": setting, "testbeds": {name: run_testbed(name, setting) for name in TESTBED_NAMES}}


def _find(rows: list[dict], ratio: float, run: str) -> dict | None:
    return next((r for r in rows if r["target"] == ratio and r["run"] == run), None)


def findings(result: dict) -> str:
    """The comparisons the question asks for, read off the rows: global against uniform, cores, basis."""
    lines = []
    for name, found in result["testbeds"].items():
        rows = found["rows"]
        for ratio in result["setting"]["ratios"]:
            parts = []
            for method in ("als", "delta", "basis"):
                uniform, best = _find(rows, ratio, f"{method}, uniform"), _find(rows, ratio, f"{method}, global")
                if uniform and best and uniform["increase"] > 0:
                    parts.append(f"{method} global/uniform {best['increase'] / uniform['increase']:.2f}x")
            one = _find(rows, ratio, "delta, global")
            for cores in (2, 4):
                several = _find(rows, ratio, f"delta, global, {cores} cores")
                if one and several and one["increase"] > 0:
                    parts.append(f"{cores} cores/1 {several['increase'] / one['increase']:.2f}x")
            calibrated = [r for r in rows if r["target"] == ratio and "data-free" not in r["run"]]
            if calibrated:
                best = min(calibrated, key=lambda r: r["increase"])
                parts.append(f"best calibrated: {best['run']} ({best['increase']:+.4f})")
            lines.append(f"- {name}, kept {ratio}: " + "; ".join(parts))
    return "\n".join(lines)


def markdown(result: dict) -> str:
    parts = [
        "Held-out loss increase (nats/byte) over the original on the validation split; `kept` is what each run really "
        "stores of the expert parameters (the target less what integer ranks leave unspent); calibrated on 64 windows "
        "of 256 bytes of the training split unless marked data-free. Ranks per (layer, projection) in "
        "benchmarks/results/budget.json.",
        "",
        findings(result),
        "",
        "![loss increase of each run, both testbeds](benchmarks/budget.png)",
    ]
    for name, found in result["testbeds"].items():
        parts += ["", f"**{TESTBED_NAMES[name]}** (original {found['original_loss']:.4f} nats/byte)", ""]
        parts.append(table(["kept target", "run", "kept", "rel. error", "loss increase", "fit s"],
                           [[r["target"], r["run"], f"{r['kept']:.3f}", f"{r['rel_error']:.4f}",
                             f"{r['increase']:+.4f}", f"{r['seconds']:.1f}"] for r in found["rows"]]))
    return "\n".join(parts)


def plot(result: dict, path) -> None:
    """Horizontal bars per testbed: each run's loss increase at each kept fraction (linear: bars start at zero)."""
    from matplotlib.figure import Figure

    names = list(result["testbeds"])
    fig = Figure(figsize=(11, 0.3 * len(RUNS) + 2))
    for ax, name in zip(fig.subplots(1, len(names), sharey=True), names):
        rows = result["testbeds"][name]["rows"]
        runs = list(dict.fromkeys(r["run"] for r in rows))
        for offset, ratio in enumerate(result["setting"]["ratios"]):
            found = {r["run"]: r["increase"] for r in rows if r["target"] == ratio}
            ax.barh([i + 0.4 * offset for i, run in enumerate(runs) if run in found],
                    [found[run] for run in runs if run in found], height=0.4, label=f"kept {ratio}")
        ax.set_yticks([i + 0.2 for i in range(len(runs))], runs, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("held-out loss increase (nats/byte), lower is better", fontsize=8)
        ax.set_title(TESTBED_NAMES[name], fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
