"""Run every benchmark and write BENCHMARKS.md with its plots: `python -m benchmarks.run_all` (`--quick` for the
tiny smoke sizes the tests use, written under --out)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks import distillation, fit_speed, inference, param_count, quality  # noqa: E402
from benchmarks.common import machine  # noqa: E402


def plot_fit_speed(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, label in (("adam", "seed adam"), ("als", "default (als + polish)")):
        seconds, errors = zip(*result["traces"][method])
        ax.plot(seconds, errors, marker="." if method == "als" else None, label=label)
    ax.axhline(result["target_error"], color="gray", linestyle="--", label="seed adam's final error")
    ax.set_xscale("log")
    ax.set_xlabel("fit time (s, log scale)")
    ax.set_ylabel("relative reconstruction error")
    ax.set_title("Fit speed, one Qwen3-30B-A3B-shaped projection")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for BENCHMARKS.md and benchmarks/*.png")
    args = parser.parse_args()
    command = "python -m benchmarks.run_all" + (" --quick" if args.quick else "")
    plots = args.out / "benchmarks"
    plots.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {}
    sections = []
    for name, module, title in (
        ("quality", quality, "1. Quality at equal storage (trained testbed)"),
        ("fit_speed", fit_speed, "2. Fit speed at real scale"),
        ("inference", inference, "3. Inference speed of the experts module"),
        ("param_count", param_count, "4. The seed's parameter-count claim"),
        ("distillation", distillation, "5. Distillation of the compressed testbed"),
    ):
        results[name] = module.run(quick=args.quick)
        sections.append(f"## {title}\n\n{module.markdown(results[name])}\n")
        print(f"{name} done after {time.time() - started:.0f} s", flush=True)
    quality.plot(results["quality"], plots / "quality.png")
    plot_fit_speed(results["fit_speed"], plots / "fit_speed.png")
    distillation.plot(results["distillation"], plots / "distillation.png")
    (plots / "results.json").write_text(json.dumps(results, indent=1, default=str))
    header = (f"# Benchmarks\n\nMachine: {machine()}.\nCommand: `{command}` ({time.time() - started:.0f} s in all). "
              "Raw figures: `benchmarks/results.json`.\n")
    sections.insert(1, "![held-out loss against kept fraction](benchmarks/quality.png)\n")
    sections.insert(3, "![error against fit time](benchmarks/fit_speed.png)\n")
    sections.append("![distillation loss curve](benchmarks/distillation.png)\n")
    (args.out / "BENCHMARKS.md").write_text("\n".join([header, *sections]))


if __name__ == "__main__":
    main()
