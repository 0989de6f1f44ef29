"""The pipeline's report.md, and the trade-off plot of a rank sweep (a Hydra callback at the end of a multirun)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from matplotlib.figure import Figure

from moe_compress.compression.report import CompressionReport, plot_errors
from moe_compress.evaluate import read_results
from moe_compress.experts import describe_form
from moe_compress.folder.load import folder_bytes
from moe_compress.pipeline.folders import PipelineRun
from moe_compress.testbed import resolve_bundled

Scores = dict[str, dict[str, float]]
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "loss")


def rank_summary(report: CompressionReport) -> str:
    """One line: the rank range of each projection over the layers, and how the ranks were chosen."""
    ranks: dict[str, list[int]] = {}
    for row in report.rows:
        ranks.setdefault(row.projection, []).append(row.rank)
    spans = ", ".join(f"{p} {min(r)}" + (f"-{max(r)}" if max(r) > min(r) else "") for p, r in ranks.items())
    return (f"Ranks ({report.config.rank_allocation} allocation) over the layers: {spans}; each (layer, "
            "projection)'s in the heat map's cells and in `compressed/compression_report.json`.")


def _markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def checkpoint_scores(results: list[dict]) -> dict[int, Scores]:
    by_step: dict[int, Scores] = {}
    for row in results:
        by_step.setdefault(row["step"], {}).setdefault(row["task"], {})[row["metric"]] = row["value"]
    return dict(sorted(by_step.items()))


def metrics_table(teacher: Scores, zero_shot: Scores, steps: dict[int, Scores]) -> str:
    columns = [(task, metric) for task in teacher for metric in teacher[task]]
    rows = [("teacher (original)", teacher), ("compressed, zero-shot", zero_shot)]
    rows += [(f"distilled, step {step}", scores) for step, scores in steps.items()]
    cell = lambda scores, t, m: f"{scores[t][m]:.4f}" if m in scores.get(t, {}) else "-"
    return _markdown_table(["model", *[f"{t} {m}" for t, m in columns]],
                           [[name, *[cell(s, t, m) for t, m in columns]] for name, s in rows])


def fitted_to(calibration: Any) -> str:
    if not calibration.calibrated:
        return "to the original weights (data-free)"
    return (f"to what each expert computes on the inputs routed to it in {calibration.num_sequences} sequences of "
            f"{calibration.data.seq_len} tokens of {calibration.data.source}")


def dtype_bits(folder: Path) -> int:
    """Bits per weight of the original's float experts: its dtype's, as the folder's config.json records it."""
    dtype = json.loads((folder / "config.json").read_text()).get("dtype") or "float32"
    return torch.finfo(getattr(torch, dtype)).bits


def write_report(run: PipelineRun, model: str, teacher: Scores) -> Path:
    """report.md in the run folder, readable by someone who did not run it, and summary.json for sweeps."""
    report = run.report
    if not (run.compressed / "compression_error.png").exists():
        plot_errors(report, run.compressed / "compression_error.png")
    steps = checkpoint_scores(read_results(run.eval_dir / "results.jsonl"))
    zero_shot = steps.pop(0, {})  # the watcher scores the compressed model before training as step 0
    source = Path(resolve_bundled(model))
    before_bytes = folder_bytes(source) if source.is_dir() else None
    after_bytes = folder_bytes(run.compressed)
    size = lambda n: f"{n / 2**20:,.1f} MiB" if n is not None else "(hub model: not measured)"
    settings = report.config
    lines = [
        f"# moe-compress pipeline: {model}",
        "",
        f"Every expert projection W_e of each MoE layer is replaced by {describe_form(settings.form)}, fitted "
        f"zero-shot (method `{settings.method}`) {fitted_to(settings.calibration)}, then distilled from the original "
        "model (the teacher).",
        "",
        "## Size",
        "",
        _markdown_table(["", "original", "compressed"], [
            ["expert parameters", f"{report.params_before:,}", f"{report.params_after:,}"],
            ["kept fraction of expert parameters", "1", f"{report.kept_fraction:.3f}"],
            ["bits per expert weight (every stored tensor and scale)", str(dtype_bits(run.compressed)),
             f"{report.bits_per_weight:.2f}"],
            ["weights on disk", size(before_bytes), size(after_bytes)],
            *([["teacher in memory while distilling", f"{run.teacher}", "-"]] if run.teacher is not None else []),
        ]),
        "",
        f"Relative reconstruction error of the expert weights: **{report.rel_error:.4f}** (before distillation).",
        *([f"The MoE blocks' output error on the calibration tokens, root mean square over the blocks: "
           f"**{report.block_error[0]:.4f} -> {report.block_error[1]:.4f}** through the layer-wise reconstruction "
           f"({report.blocks[0].steps} steps a block)."] if report.blocks else []),
        "",
        rank_summary(report),
        "",
        "![relative error by layer and projection](compressed/compression_error.png)",
        "",
        *(["Calibration coverage, tokens routed to each expert (`compressed/compression_report.json` holds the "
           "counts):", "", "![calibration tokens per expert and layer](compressed/calibration_coverage.png)", ""]
          if report.coverage else []),
        "## Quality",
        "",
        metrics_table(teacher, zero_shot, steps),
        "",
        "![each metric against distillation step, the teacher dashed](eval/scores.png)",
        "",
        "## Wall time of each stage",
        "",
        _markdown_table(["stage", "seconds"], [[stage, f"{s:.1f}"] for stage, s in run.seconds.items()]),
        "",
        "The run's resolved configuration is in `.hydra/config.yaml`; the compressed model in `compressed/`, the "
        "distillation checkpoints in `distill/`, the scores in `eval/results.jsonl`.",
    ]
    path = run.folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    final = steps[max(steps)] if steps else zero_shot
    summary = {"kept_fraction": report.kept_fraction, "rel_error": report.rel_error, "method": settings.method,
               "rank": settings.rank, "target_ratio": settings.target_ratio, "teacher": teacher,
               "zero_shot": zero_shot, "distilled": final}
    (run.folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return path


def plot_tradeoff(summaries: list[dict], path: Path) -> None:
    """Quality against kept fraction: one point per run of a sweep, zero-shot and distilled, the original a line."""
    metrics = [(t, m) for t, values in summaries[0]["teacher"].items() for m in values]
    figure = Figure(figsize=(4.8 * len(metrics), 3.6), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    runs = sorted(summaries, key=lambda s: s["kept_fraction"])
    for ax, (task, metric) in zip(axes, metrics):
        x = [s["kept_fraction"] for s in runs]
        for key, label in (("zero_shot", "compressed, zero-shot"), ("distilled", "compressed, distilled")):
            ax.plot(x, [s[key][task][metric] for s in runs], "o-", label=label)
        ax.axhline(runs[0]["teacher"][task][metric], color="gray", linestyle="--", label="original")
        better = "lower" if any(w in metric for w in LOWER_IS_BETTER) else "higher"
        ax.set(title=f"{task}: {metric} ({better} is better)", xlabel="kept fraction of expert parameters")
        ax.legend(fontsize="small")
    figure.savefig(path, dpi=110)


class TradeoffPlot(Callback):
    """At the end of `moe-compress pipeline -m ...`: tradeoff.png and tradeoff.md in the sweep folder."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
        if not summaries:
            return
        plot_tradeoff(summaries, sweep / "tradeoff.png")
        rows = [[s["rank"] if s["rank"] is not None else "-", f"{s['kept_fraction']:.3f}", f"{s['rel_error']:.4f}",
                 *[f"{s[k][t][m]:.4f}" for k in ("zero_shot", "distilled") for t in s["teacher"]
                   for m in s["teacher"][t]]] for s in sorted(summaries, key=lambda s: s["kept_fraction"])]
        metrics = [f"{t} {m}" for t in summaries[0]["teacher"] for m in summaries[0]["teacher"][t]]
        header = ["rank", "kept fraction", "rel. error", *[f"{k} {name}" for k in ("zero-shot", "distilled")
                                                            for name in metrics]]
        (sweep / "tradeoff.md").write_text("# Rank sweep\n\n" + _markdown_table(header, rows)
                                           + "\n\n![quality against kept fraction](tradeoff.png)\n")
