"""What every benchmark shares: the machine's description, medians of interleaved repeats, markdown tables."""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
import os
import platform
import resource
import statistics
import time
from typing import Callable, Iterator

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        # the vector extensions torch's kernels use (AVX2, AVX512...): speed tables depend on them (bf16 matmuls are
        # slow without AVX512's bf16 instructions)
        device = (f"CPU only, {os.cpu_count()} cores ({cpu}, {torch.backends.cpu.get_cpu_capability()}), "
                  f"{torch.get_num_threads()} torch threads")
    return f"{device}; torch {torch.__version__}; Python {platform.python_version()}"


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, run in turns so that a noisy machine slows all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far. VmHWM, unlike ru_maxrss, starts afresh in an exec'd child."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def in_fresh_process(fn: Callable, *args):
    """fn(*args) run in a new Python process (spawned: nothing inherited, memory high-water mark included); a crash
    there raises here instead of leaving this process waiting."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


@contextmanager
def plot_to(path, title: str, xlabel: str, ylabel: str, title_size: str | float = "large") -> Iterator[Axes]:
    """Axes to draw a benchmark's curves on; on exit titled, labelled, with a legend, saved as a PNG at `path`. No
    pyplot: no global state, no backend to choose."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    yield ax
    ax.set_title(title, fontsize=title_size)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def stored_part(section: str, key: str, command: str, fn: Callable[[], dict], store: bool) -> dict:
    """A part of a section run on its own: fn()'s result with its meta (machine, time, command), stored under `key`
    in benchmarks/results/<section>.json beside the section's other figures when `store`."""
    started = time.time()
    part = fn()
    part["meta"] = {"machine": machine(), "seconds": time.time() - started, "date": time.strftime("%Y-%m-%d"),
                    "command": command}
    if store:
        path = Path(__file__).parent / "results" / f"{section}.json"
        result = json.loads(path.read_text())
        result[key] = part
        path.write_text(json.dumps(result, indent=1, default=str))
    return part


def part_cli(doc: str, section: str, key: str, run: Callable[[bool], dict], markdown: Callable[[dict], str],
             part: Callable[[bool], dict], part_markdown: Callable[[dict], str]) -> None:
    """The command line of a section with a part that also runs alone: `python -m benchmarks.<section>` prints the
    whole section; `--<key>` runs only the part and stores it beside the section's figures (stored_part); `--quick`
    takes tiny sizes, printed, not stored."""
    flag = key.replace("_", "-")
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(f"--{flag}", action="store_true", help=f"run only the {flag} part and store it in "
                        f"benchmarks/results/{section}.json beside the section's other figures")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, printed, not stored")
    args = parser.parse_args()
    if not getattr(args, key):
        print(markdown(run(args.quick)))
        return
    print(part_markdown(stored_part(section, key, f"python -m benchmarks.{section} --{flag}",
                                    lambda: part(args.quick), store=not args.quick)))
