"""Question 9: where should the parameter budget go? Rank allocation, several cores, and the shared-basis form.

On both bundled testbeds at kept 0.3 and 0.5 of the expert parameters, calibrated on the windows of §1 (and a few
data-free rows for reference): each form (als's wrapper, delta, basis, and mixed: basis for gate and up, delta for
down) with uniform ranks and with the global allocation, and delta with 2, 4 and auto cores (k-means groups; auto
picks 1, 2 or 4 per module by the error curves); then every assignment of delta or basis to gate, up and down, each
projection taken from that form's globally allocated fit. Held-out loss increase over the original on the validation
split, the kept fraction each run really stores (integer ranks leave some of the budget unspent), the weight-space
relative error and the fit time (one run each: the fits are deterministic).

How far any rank allocation could go (`oracle`): on the fine testbed at kept 0.3 with the default form, each unit's
rank one step up and one step down from the uniform ranks with the loss measured each time, and the best set of those
steps within the budget by the measured marginals, measured in turn.

Fit time at real scale (`python -m benchmarks.budget --fit-times`, stored beside): each projection shape of
Qwen3-30B-A3B (128 experts; gate/up 768 x 2048, down 2048 x 768) fitted by delta and basis in a calibrated metric, at
the storage of wrapper rank 16, on the synthetic experts and metrics of §2, in one fresh process; CPU seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import sys
import time

import torch

from benchmarks.common import in_fresh_process, part_cli, table
from benchmarks.fit_speed import clock, synthetic_experts, synthetic_metrics
from benchmarks.quality import TESTBED_NAMES, testbed_setting
from moe_compress import CompressionConfig, SharedCoreExperts, compress
from moe_compress import fit
from moe_compress.compression.budget import RankTooLargeError, max_rank, stored_params
from moe_compress.compression.in_memory import compress_as, plan
from moe_compress.discovery import split_weights

RUNS = [  # (method, rank allocation, cores, calibrated)
    ("als", "uniform", 1, True), ("als", "global", 1, True),
    ("delta", "uniform", 1, True), ("delta", "global", 1, True),
    ("basis", "uniform", 1, True), ("basis", "global", 1, True),
    ("mixed", "uniform", 1, True), ("mixed", "global", 1, True),
    ("delta", "global", 2, True), ("delta", "global", 4, True), ("delta", "global", "auto", True),
    ("als", "uniform", 1, False), ("als", "global", 1, False),
    ("delta", "uniform", 1, False), ("delta", "global", 1, False),
    ("basis", "uniform", 1, False), ("basis", "global", 1, False),
]
FULL = dict(ratios=(0.3, 0.5), runs=RUNS, calibration_sequences=64, max_tokens=None)
ORACLE = dict(testbed="testbed_fine", ratio=0.3, method="mixed")
QUICK = dict(ratios=(0.3,), runs=[("delta", "global", 1, True), ("basis", "global", 1, True),
                                  ("delta", "uniform", 2, False)], calibration_sequences=4, max_tokens=1024)


FIT_TIMES = dict(experts=128, shapes={"gate/up": (768, 2048, "up"), "down": (2048, 768, "down")}, rank=16,
                 tokens=(256, 4096), iters=3)
QUICK_FIT_TIMES = dict(experts=8, shapes={"gate/up": (24, 40, "up"), "down": (40, 24, "down")}, rank=2,
                       tokens=(16, 128), iters=2)


def fit_times(settings: dict) -> list[dict]:
    """Seconds (this process's CPU time, or wall time on a GPU) and metric error of delta and basis on each shape."""
    rows = []
    E, rank = settings["experts"], settings["rank"]
    for name, (out_f, in_f, projection) in settings["shapes"].items():
        W = synthetic_experts({"experts": E, "out": out_f, "inp": in_f})
        M = synthetic_metrics(E, in_f, settings["tokens"])
        width = max_rank(E, out_f, in_f, stored_params(E, out_f, in_f, rank), "basis", projection)
        for form, fitted in (("delta", lambda: fit.fit_delta(W, rank, settings["iters"], metric=M)),
                             ("basis", lambda: fit.fit_basis(W, width, "out" if projection == "down" else "in",
                                                             settings["iters"], metric=M))):
            start = clock()
            factors = fitted()
            seconds = clock() - start
            W_hat = factors["core"] + factors["u"] @ factors["v"].mT
            rows.append({"shape": f"{name} {out_f} x {in_f}", "form": form,
                         "width": 2 * rank if form == "delta" else width, "seconds": seconds,
                         "metric_error": fit.relative_error(W, W_hat, M)})
    return rows


def label(method: str, allocation: str, cores: int, calibrated: bool) -> str:
    return f"{method}, {allocation}{f', {cores} cores' if cores != 1 else ''}{'' if calibrated else ', data-free'}"


def form_combinations(fitted: dict[str, torch.nn.Module], loss, base: float) -> dict[str, float]:
    """Loss increase of every assignment of delta or basis to (gate, up, down), each projection taken from that form's
    fitted model (both calibrated, global ranks, so each stores about the same)."""
    found = {}
    for forms in itertools.product(("delta", "basis"), repeat=3):
        model = copy.deepcopy(fitted["delta"])
        for name, module in model.named_modules():
            if isinstance(module, SharedCoreExperts):
                for projection, form in zip(("gate", "up", "down"), forms):
                    module.projections[projection] = copy.deepcopy(
                        fitted[form].get_submodule(name).projections[projection])
        found["/".join(forms)] = loss(model) - base
    return found


def run_testbed(name: str, setting: dict) -> dict:
    original, loss, base, calibration = testbed_setting(name, setting)
    rows, combinations = [], {}
    for ratio in setting["ratios"]:
        fitted = {}
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
            if allocation == "global" and cores == 1 and calibrated and method in ("delta", "basis"):
                fitted[method] = model
        if len(fitted) == 2:
            combinations[str(ratio)] = form_combinations(fitted, loss, base)
    return {"original_loss": base, "rows": rows, "combinations": combinations}


def with_ranks(original: torch.nn.Module, config: CompressionConfig, calibration: torch.Tensor,
               ranks: dict[tuple[str, str], int]) -> torch.nn.Module:
    """A calibrated copy of `original` compressed with the given rank of each (layer, projection)."""
    model = copy.deepcopy(original)
    specs = {name: dataclasses.replace(spec, ranks={p: ranks.get((name, p), r) for p, r in spec.ranks.items()})
             for name, spec in plan(model, config).items()}
    compress_as(model, specs, config, calibration, progress=False)
    return model


def oracle(setting: dict) -> dict:
    """How far any rank allocation could go: from the uniform ranks, each unit one step up and one step down (a step
    stores about what one delta rank stores), loss measured; the best set of steps within the budget by those measured
    marginals (summed as if independent, every choice of -1/0/+1 per unit tried), then measured itself."""
    original, loss, base, calibration = testbed_setting(setting["testbed"], FULL)
    config = CompressionConfig(target_ratio=setting["ratio"], method=setting["method"]).for_data(True)
    specs = plan(original, config)
    shapes = {(name, p): W.shape for name in specs for p, (W, _) in split_weights(original.get_submodule(name)).items()}
    uniform = {(name, p): r for name, spec in specs.items() for p, r in spec.ranks.items()}
    stored = lambda unit, rank, form=None: stored_params(*shapes[unit], rank, 1, form or config.form_of(unit[1]),
                                                         unit[1])
    step = {u: max(1, round((stored(u, 1, "delta") - stored(u, 0, "delta")) / (stored(u, 1) - stored(u, 0))))
            for u in uniform}
    increase = lambda ranks: loss(with_ranks(original, config, calibration, ranks)) - base
    at_uniform = increase(uniform)
    units = list(uniform)
    options = []  # per unit: (sign, measured change of the loss increase, parameters spent)
    for u in units:
        up = {**uniform, u: uniform[u] + step[u]}
        options.append([(0, 0.0, 0), (1, increase(up) - at_uniform, stored(u, up[u]) - stored(u, uniform[u]))])
        if uniform[u] > step[u]:
            down = {**uniform, u: uniform[u] - step[u]}
            options[-1].append((-1, increase(down) - at_uniform, stored(u, down[u]) - stored(u, uniform[u])))
    room = setting["ratio"] * sum(E * o * i for E, o, i in shapes.values()) - sum(stored(u, uniform[u]) for u in units)
    best = (0.0, [0] * len(units))
    for choice in itertools.product(*options):
        if sum(spent for _, _, spent in choice) <= room:
            best = min(best, (sum(change for _, change, _ in choice), [sign for sign, _, _ in choice]))
    chosen = {u: uniform[u] + sign * step[u] for u, sign in zip(units, best[1])}
    return {**setting, "uniform": at_uniform, "uniform_ranks": list(uniform.values()), "steps": list(step.values()),
            "marginals": {f"{u[0]}.{u[1]} {sign:+d}": change for u, found in zip(units, options)
                          for sign, change, _ in found[1:]},
            "predicted": at_uniform + best[0], "chosen_ranks": list(chosen.values()), "measured": increase(chosen)}


def run(quick: bool = False) -> dict:
    setting = QUICK if quick else FULL
    result = {"setting": setting, "testbeds": {name: run_testbed(name, setting) for name in TESTBED_NAMES}}
    if not quick:  # 25 calibrated compressions of the fine testbed: not for the smoke run
        result["oracle"] = oracle(ORACLE)
    return result


def _find(rows: list[dict], ratio: float, run: str) -> dict | None:
    return next((r for r in rows if r["target"] == ratio and r["run"] == run), None)


def findings(result: dict) -> str:
    """The comparisons the question asks for, read off the rows: global against uniform, cores, basis."""
    lines = []
    for name, found in result["testbeds"].items():
        rows = found["rows"]
        for ratio in result["setting"]["ratios"]:
            parts = []
            for method in ("als", "delta", "basis", "mixed"):
                uniform, best = _find(rows, ratio, f"{method}, uniform"), _find(rows, ratio, f"{method}, global")
                if uniform and best and uniform["increase"] > 0:
                    parts.append(f"{method} global/uniform {best['increase'] / uniform['increase']:.2f}x")
            one = _find(rows, ratio, "delta, global")
            for cores in (2, 4, "auto"):
                several = _find(rows, ratio, f"delta, global, {cores} cores")
                if one and several and one["increase"] > 0:
                    parts.append(f"{cores} cores/1 {several['increase'] / one['increase']:.2f}x")
            default = _find(rows, ratio, f"{CompressionConfig(target_ratio=ratio).for_data(True).method}, global")
            before = _find(rows, ratio, "delta, uniform")  # the default when this question was asked
            if default and before:
                parts.append(f"the default ({default['run']}) against uniform delta "
                             f"{default['increase'] / before['increase']:.2f}x")
            calibrated = [r for r in rows if r["target"] == ratio and "data-free" not in r["run"]]
            if calibrated:
                best = min(calibrated, key=lambda r: r["increase"])
                parts.append(f"best calibrated: {best['run']} ({best['increase']:+.4f})")
            lines.append(f"- {name}, kept {ratio}: " + "; ".join(parts))
    return "\n".join(lines)


def fit_times_markdown(part: dict) -> str:
    meta = part["meta"]
    return (f"Fit time at Qwen3-30B-A3B's shapes, calibrated (module docstring). Machine: {meta['machine']}. Command: "
            f"`{meta['command']}` ({meta['seconds']:.0f} s, {meta['date']}).\n\n"
            + table(["projection", "form", "columns per expert (delta 2r) / basis width k", "seconds", "metric error"],
                    [[r["shape"], r["form"], r["width"], f"{r['seconds']:.1f}", f"{r['metric_error']:.4f}"]
                     for r in part["rows"]]))


def combinations_markdown(result: dict) -> str:
    """One row per testbed and kept fraction, one column per assignment of forms to gate/up/down."""
    names = list(next(iter(next(iter(result["testbeds"].values()))["combinations"].values()), {}))
    rows = []
    for name, found in result["testbeds"].items():
        for ratio, increases in found["combinations"].items():
            best = min(increases.values())
            rows.append([TESTBED_NAMES[name].split(" (")[0], ratio] + [
                f"**{v:+.4f}**" if v == best else f"{v:+.4f}" for v in increases.values()])
    return ("Which form for which projection: the loss increase of every assignment of delta or basis to gate/up/down "
            "(each projection taken from that form's calibrated fit with global ranks; best in bold). "
            "`method=mixed` is basis/basis/delta.\n\n" + table(["testbed", "kept", *names], rows))


def oracle_markdown(result: dict) -> str:
    found = result["oracle"]
    rows = result["testbeds"][found["testbed"]]["rows"]
    allocated = _find(rows, found["ratio"], f"{found['method']}, global")
    changes = found["marginals"].values()
    return (f"How far rank allocation alone could go ({found['testbed']}, kept {found['ratio']}, {found['method']}, "
            f"calibrated): from the uniform ranks (+{found['uniform']:.4f}), one step of one unit changes the loss "
            f"increase by {min(changes):+.4f} to {max(changes):+.4f}. The best set of steps within the budget by "
            f"these measured marginals predicts {found['predicted']:+.4f} and measures {found['measured']:+.4f} "
            f"({found['measured'] / found['uniform']:.2f}x uniform; ranks {found['chosen_ranks']} from "
            f"{found['uniform_ranks']}); the global allocation, from one decomposition per unit and no loss "
            f"measured, {allocated['increase']:+.4f} ({allocated['increase'] / found['uniform']:.2f}x)."
            if allocated else "")


def markdown(result: dict) -> str:
    parts = [
        "Held-out loss increase (nats/byte) over the original on the validation split; `kept` is what each run really "
        "stores of the expert parameters (the target less what integer ranks leave unspent); calibrated on 64 windows "
        "of 256 bytes of the training split unless marked data-free. Ranks per (layer, projection) in "
        "benchmarks/results/budget.json.",
        "",
        findings(result),
        *(["", oracle_markdown(result)] if "oracle" in result else []),
        "",
        "![loss increase of each run, both testbeds](benchmarks/budget.png)",
        *(["", fit_times_markdown(result["fit_times"])] if "fit_times" in result else []),
    ]
    parts += ["", combinations_markdown(result)]
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


def main() -> None:
    part_cli(__doc__, "budget", "fit_times", run, markdown,
             lambda quick: {"rows": in_fresh_process(fit_times, QUICK_FIT_TIMES if quick else FIT_TIMES)},
             fit_times_markdown)


if __name__ == "__main__":
    main()
