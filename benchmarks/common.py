"""What every benchmark shares: the machine's description, medians of interleaved repeats, markdown tables."""

from __future__ import annotations

import multiprocessing
import os
import platform
import resource
import statistics
import time
from typing import Callable

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU only, {os.cpu_count()} cores ({cpu}), {torch.get_num_threads()} torch threads"
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


def _call(fn: Callable, args: tuple, queue) -> None:
    queue.put(fn(*args))


def in_fresh_process(fn: Callable, *args):
    """fn(*args) run in a new Python process (spawned, so nothing is inherited, memory high-water mark included)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_call, args=(fn, args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result
