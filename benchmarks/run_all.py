"""Run every benchmark and write BENCHMARKS.md with its plots: `python -m benchmarks.run_all` (`--quick` for the
tiny smoke sizes the tests use, written under --out)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks import (bits, budget, calibration, distillation, fit_speed, inference, param_count, quality, startup,
                        streaming, vllm_serving)
from benchmarks.common import machine


SECTIONS = {
    "quality": (quality, "1. Quality at equal storage, both testbeds, against pruning and merging"),
    "fit_speed": (fit_speed, "2. Fit speed at real scale"),
    "inference": (inference, "3. Inference speed of the experts module"),
    "param_count": (param_count, "4. The seed's parameter-count claim"),
    "distillation": (distillation, "5. Distillation of the compressed testbed"),
    "streaming": (streaming, "6. Streaming, parallel compression of a checkpoint folder"),
    "startup": (startup, "7. Start-up cost of the loading hook"),
    "calibration": (calibration, "8. Cost of calibration, in memory and time"),
    "budget": (budget, "9. Where the budget goes: rank allocation, several cores, a shared basis"),
    "vllm_serving": (vllm_serving, "10. Serving with vLLM at Qwen3-30B-A3B's shapes: tokens per second and memory"),
    "bits": (bits, "11. Quality against bits per weight: the compressed forms beside the quantizers"),
}
# seconds of each section's smoke run (--quick --jobs 2, 2026-12-03), for --jobs to start the longest first
SMOKE_SECONDS = {"distillation": 84, "calibration": 74, "inference": 60, "streaming": 39, "quality": 25,
                 "fit_speed": 33, "bits": 42, "budget": 18, "startup": 3, "vllm_serving": 1}
# the figures a section's own markdown does not embed
FIGURES = {"fit_speed": "![error against fit time](benchmarks/fit_speed.png)",
           "distillation": "![distillation loss curve](benchmarks/distillation.png)",
           "vllm_serving": "![tokens per second in vLLM against bits per expert weight](benchmarks/vllm_serving.png)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for BENCHMARKS.md and benchmarks/*")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to (re)run; the others "
                        "are taken from their last saved results")
    parser.add_argument("--jobs", type=int, default=1, help="sections run at once, in that many processes; "
                        "they then slow each other down, so only for smoke runs")
    args = parser.parse_args()
    names = args.only.split(",")
    if args.jobs > 1 and len(names) > 1:
        # longest first, so that the processes end together; each process imports torch once for its sections
        order = sorted(names, key=lambda name: -SMOKE_SECONDS.get(name, 0))
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(run_section, order, [args.quick] * len(order), [args.out] * len(order)))
    else:
        for name in names:
            run_section(name, args.quick, args.out)
    write_report(args.out)


def run_section(name: str, quick: bool, out: Path) -> None:
    """Run one section and store its figures in benchmarks/results/<name>.json under `out`."""
    folder = out / "benchmarks" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result = SECTIONS[name][0].run(quick=quick)
    result["meta"] = {"machine": machine(), "seconds": time.time() - started, "date": time.strftime("%Y-%m-%d"),
                      "command": f"python -m benchmarks.run_all --only {name}" + (" --quick" if quick else "")}
    path = folder / f"{name}.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    # parts of a section that run alone (stored_part: they carry their own meta) outlive a rerun of the rest
    result.update({k: v for k, v in previous.items() if k not in result and isinstance(v, dict) and "meta" in v})
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"{name} done in {result['meta']['seconds']:.0f} s", flush=True)


def write_report(out: Path) -> None:
    """BENCHMARKS.md and the plots, from every section's saved results."""
    sections = ["# Benchmarks\n\nEvery section says the machine and the command that produced it; "
                "`python -m benchmarks.run_all` reruns them all. Raw figures: `benchmarks/results/`.\n"]
    for name, (module, title) in SECTIONS.items():
        path = out / "benchmarks" / "results" / f"{name}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        meta = result["meta"]
        sections.append(f"## {title}\n\nMachine: {meta['machine']}. Command: `{meta['command']}` "
                        f"({meta['seconds']:.0f} s, {meta['date']}).\n\n{module.markdown(result)}\n")
        if hasattr(module, "plot"):
            module.plot(result, out / "benchmarks" / f"{name}.png")
        if name in FIGURES:
            sections.append(FIGURES[name] + "\n")
    (out / "BENCHMARKS.md").write_text("\n".join(sections))


if __name__ == "__main__":
    main()
