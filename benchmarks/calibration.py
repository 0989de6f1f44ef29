"""Question 8: what calibration costs, in memory and in time, when compressing a checkpoint folder.

- memory: the synthetic checkpoints of §6 (layers of 128 experts, 1024 x 32, bf16) compressed with a cheap fit (delta,
  rank 1), calibrated on random token ids: the statistics pass runs the layers one at a time, offloaded to disk. Peak
  resident memory (VmHWM of a fresh process) against checkpoint size, beside the data-free run's.
- time: on each bundled testbed, compress_checkpoint with its preset's calibration (64 sequences of 256 bytes of the
  training split) against data-free, default settings otherwise, median of 3 runs taken in turns, fresh processes with
  1 torch thread.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import table
from benchmarks.streaming import MEMORY, QUICK_MEMORY, _compress_run, model_config, write_checkpoint
from moe_compress.testbed import TESTBEDS

RANDOM_CALIBRATION = [8, 128]  # sequences, tokens
TIME = dict(repeats=3, settings={"target_ratio": 0.3}, testbeds=tuple(TESTBEDS),
            calibration={"source": "testbed", "num_sequences": 64, "seq_len": 256})
QUICK_TIME = dict(repeats=1, settings={"target_ratio": 0.3, "polish_steps": 5}, testbeds=("testbed",),
                  calibration={"source": "testbed", "num_sequences": 4, "seq_len": 64})
QUICK_MEMORY_LAYERS = (2,)  # the smoke run: one small checkpoint


def memory_row(folder: Path, shape: dict, layers: int) -> dict:
    source = folder / "checkpoint"
    sizes = write_checkpoint(source, model_config(layers, shape["experts"], shape["hidden"], shape["width"]))
    runs = {}
    for kind, extra in (("data-free", {}), ("calibrated", {"random_calibration": RANDOM_CALIBRATION})):
        runs[kind] = _compress_run(source, folder / kind, {**shape["settings"], **extra}, 1)
    shutil.rmtree(folder)
    return {"layers": layers, **sizes, **runs}


def time_rows(setting: dict) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory(prefix="calibration-bench-") as folder:
        for name in setting["testbeds"]:
            path = TESTBEDS[name]
            runs: dict[str, list[float]] = {"data-free": [], "calibrated": []}
            for _ in range(setting["repeats"]):
                for kind in runs:
                    extra = {"calibration": setting["calibration"]} if kind == "calibrated" else {}
                    out = Path(folder) / f"{name}-{kind}"  # removed after each run: no statistics are reused
                    runs[kind].append(_compress_run(path, out, {**setting["settings"], **extra}, 1)["call_s"])
                    shutil.rmtree(out)
            rows[name] = {kind: statistics.median(times) for kind, times in runs.items()}
            rows[name]["ratio"] = rows[name]["calibrated"] / rows[name]["data-free"]
    return rows


def run(quick: bool = False) -> dict:
    memory, timing = (QUICK_MEMORY, QUICK_TIME) if quick else (MEMORY, TIME)
    layers = QUICK_MEMORY_LAYERS if quick else memory["layers"]
    with tempfile.TemporaryDirectory(prefix="calibration-memory-") as folder:
        rows = [memory_row(Path(folder) / str(n), memory, n) for n in layers]
    return {"memory": {**memory, "rows": rows}, "time": {**timing, "rows": time_rows(timing)}}


def markdown(result: dict) -> str:
    m, t = result["memory"], result["time"]
    memory_rows = [[r["layers"], f"{r['checkpoint_mib']:,.0f}", f"{r['data-free']['peak_rss_mib']:,.0f}",
                    f"{r['calibrated']['peak_rss_mib']:,.0f}", f"{r['data-free']['call_s']:.1f}",
                    f"{r['calibrated']['call_s']:.1f}"] for r in m["rows"]]
    time_rows_ = [[name, f"{r['data-free']:.1f}", f"{r['calibrated']:.1f}", f"{r['ratio']:.2f}x"]
                  for name, r in t["rows"].items()]
    return (
        f"**Memory**: layers of {m['experts']} experts ({m['hidden']} x {m['width']}), settings {m['settings']}, "
        f"calibrated on {RANDOM_CALIBRATION[0]} random sequences of {RANDOM_CALIBRATION[1]} tokens, 1 process.\n\n"
        + table(["layers", "checkpoint MiB", "data-free peak RSS MiB", "calibrated peak RSS MiB", "data-free s",
                 "calibrated s"], memory_rows)
        + f"\n\n**Time** on the bundled testbeds (settings {t['settings']}, calibration {t['calibration']}, median of "
        f"{t['repeats']} runs in turns; goal: at most 2x data-free):\n\n"
        + table(["testbed", "data-free s", "calibrated s", "calibrated / data-free"], time_rows_)
    )


if __name__ == "__main__":
    print(markdown(run()))
