"""Question 6: can a checkpoint be compressed without fitting in memory, as fast as reading it and fitting it allows,
and faster on more processes?

Synthetic Qwen3-MoE checkpoints, the testbed scaled up: bf16, per-expert tensors as hub checkpoints store them (one
shard per layer), written layer by layer so that the writer never holds the model either. Every measurement runs in a
fresh process with 1 torch thread per process, on a page cache warm from writing (a cold disk slows reading and
compressing alike).

- speed: the testbed's expert shape (hidden 128, width 256) with 16 experts and 32 layers, default settings
  (target_ratio 0.3, als): the wall time of compress_checkpoint against the time to read every tensor plus the fits'
  own time (sum over (layer, projection) of the report's seconds), and 1 process against 2 (torchrun, gloo), the
  median of 3 runs taken in turns. Each process's CPU share (CPU time over wall time) says how busy the machine was.
- memory: a cheap fit (delta, rank 1) on checkpoints of growing size: peak resident memory (VmHWM) against checkpoint
  size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Qwen3MoeConfig
from transformers.core_model_loading import revert_weight_conversion

from benchmarks.common import peak_rss_mib, table
from moe_compress import CompressionConfig
from moe_compress import compress_checkpoint

ROOT = Path(__file__).parent.parent
SPEED = dict(layers=32, experts=16, hidden=128, width=256, settings={"target_ratio": 0.3}, repeats=3)
MEMORY = dict(layers=(20, 80, 160), experts=128, hidden=1024, width=32,
              settings={"rank": 1, "method": "delta", "als_iters": 1})
QUICK_SPEED = dict(layers=4, experts=4, hidden=64, width=32, settings={"rank": 2, "polish_steps": 5}, repeats=1)
QUICK_MEMORY = dict(layers=(2,), experts=4, hidden=64, width=32, settings=MEMORY["settings"])


def model_config(layers: int, experts: int, hidden: int, width: int) -> Qwen3MoeConfig:
    """The testbed's architecture (byte vocabulary, 4 heads of 32, top-2) at the given size."""
    return Qwen3MoeConfig(vocab_size=256, hidden_size=hidden, moe_intermediate_size=width, intermediate_size=2 * width,
                          num_hidden_layers=layers, num_experts=experts, num_experts_per_tok=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, dtype="bfloat16")


def write_checkpoint(folder: Path, config: Qwen3MoeConfig, seed: int = 0) -> dict:
    """One shard per layer (and one for the rest), each in the hub's per-expert layout through transformers' own
    save-time conversion; returns the checkpoint's and its experts' sizes in MiB."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    groups: dict[str, list[str]] = {}
    for key in model.state_dict():
        layer = key.split(".")[2] if key.startswith("model.layers.") else "rest"
        groups.setdefault(layer, []).append(key)
    generator = torch.Generator().manual_seed(seed)
    meta, weight_map, sizes = model.state_dict(), {}, {"checkpoint_mib": 0, "experts_mib": 0}
    folder.mkdir(parents=True)
    for i, keys in enumerate(groups.values()):
        layer = {k: ((torch.rand(meta[k].shape, generator=generator) - 0.5) / 8).to(torch.bfloat16) for k in keys}
        layer = {k: v.contiguous() for k, v in revert_weight_conversion(model, layer).items()}
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(layer, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(layer, name))
        sizes["checkpoint_mib"] += sum(v.nbytes for v in layer.values()) / 2**20
        sizes["experts_mib"] += sum(v.nbytes for k, v in layer.items() if ".experts." in k) / 2**20
    index = {"metadata": {"total_size": int(sizes["checkpoint_mib"] * 2**20)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(folder)
    return sizes


def _fresh(*args: str, processes: int = 0) -> list[dict]:
    """Run this file's worker in fresh processes (under torchrun when `processes`), one JSON line back from each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes)] if processes else []
    command = [sys.executable, *launcher, "-m", "benchmarks.streaming", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def read_all(folder: Path) -> dict:
    """Every tensor of the checkpoint copied into memory, one shard at a time."""
    start = time.perf_counter()
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                f.get_tensor(key).clone()
    return {"seconds": time.perf_counter() - start}


def compress(source: Path, output: Path, settings: dict) -> dict:
    """`settings` are CompressionConfig's, plus "random_calibration": [sequences, tokens] for random token ids."""
    imports = peak_rss_mib()
    shape = settings.pop("random_calibration", None)
    ids = None if shape is None else torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0))
    start, cpu = time.perf_counter(), time.process_time()
    report = compress_checkpoint(source, output, CompressionConfig(**settings), progress=False,
                                 max_shard_size="200MB", calibration=ids)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "fit_seconds": report.seconds, "peak_rss_mib": peak_rss_mib(),
            "imports_rss_mib": imports, "rank": int(os.environ.get("RANK", "0")),
            "cpu_share": (time.process_time() - cpu) / seconds}  # below 1: other work on the machine took the rest


def _compress_run(source: Path, folder: Path, settings: dict, processes: int) -> dict:
    start = time.perf_counter()
    ranks = _fresh("compress", str(source), str(folder / f"out-{processes}"), json.dumps(settings),
                   processes=processes if processes > 1 else 0)
    main = next(r for r in ranks if r["rank"] == 0)
    return {"wall_s": time.perf_counter() - start, "call_s": main["seconds"], "fit_s": main["fit_seconds"],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks), "imports_rss_mib": main["imports_rss_mib"],
            "cpu_share": min(r["cpu_share"] for r in ranks)}


def measure(folder: Path, shape: dict, layers: int, processes: tuple[int, ...], repeats: int = 1) -> dict:
    """Write a checkpoint of `layers` layers into `folder`, read it, and compress it on each number of `processes`,
    `repeats` times in turns (so that a busy machine slows each alike); the run of median time is kept."""
    source = folder / "checkpoint"
    sizes = write_checkpoint(source, model_config(layers, shape["experts"], shape["hidden"], shape["width"]))
    row = {"layers": layers, **sizes, "read_s": _fresh("read", str(source))[0]["seconds"]}
    runs: dict[int, list[dict]] = {n: [] for n in processes}
    for _ in range(repeats):
        for n in processes:
            runs[n].append(_compress_run(source, folder, shape["settings"], n))
    for n, done in runs.items():
        row[str(n)] = sorted(done, key=lambda run: run["call_s"])[len(done) // 2]
    shutil.rmtree(folder)  # the next checkpoint may be larger: free the disk
    row["fit_s"] = row["1"]["fit_s"]
    row["over_read_and_fit"] = row["1"]["call_s"] / (row["read_s"] + row["fit_s"])
    return row


def run(quick: bool = False) -> dict:
    speed, memory = (QUICK_SPEED, QUICK_MEMORY) if quick else (SPEED, MEMORY)
    with tempfile.TemporaryDirectory(prefix="streaming-bench-") as folder:
        speed_row = measure(Path(folder) / "speed", speed, speed["layers"], (1, 2), speed["repeats"])
        speed_row["speedup"] = speed_row["1"]["call_s"] / speed_row["2"]["call_s"]
        memory_rows = [measure(Path(folder) / f"memory-{layers}", memory, layers, (1,)) for layers in memory["layers"]]
    return {"speed": {**speed, **speed_row}, "memory": {**memory, "rows": memory_rows}}


def markdown(result: dict) -> str:
    s, m = result["speed"], result["memory"]
    speed_rows = [[n, f"{s[n]['call_s']:.1f}", f"{s[n]['wall_s']:.1f}", f"{s[n]['fit_s']:.1f}",
                   f"{s[n]['cpu_share']:.2f}", f"{s['1']['call_s'] / s[n]['call_s']:.2f}x"] for n in ("1", "2")]
    memory_rows = [[r["layers"], f"{r['checkpoint_mib']:,.0f}", f"{r['experts_mib']:,.0f}", f"{r['1']['peak_rss_mib']:,.0f}",
                    f"{r['1']['peak_rss_mib'] - r['1']['imports_rss_mib']:,.0f}", f"{r['read_s']:.1f}",
                    f"{r['fit_s']:.1f}", f"{r['1']['call_s']:.1f}", f"{r['over_read_and_fit']:.2f}"] for r in m["rows"]]
    return (
        f"**Speed**: {s['layers']} layers of {s['experts']} experts ({s['hidden']} x {s['width']}), "
        f"{s['checkpoint_mib']:,.0f} MiB, settings {s['settings']}. Reading every tensor takes {s['read_s']:.1f} s and the "
        f"fits {s['fit_s']:.1f} s; the whole compression takes {s['1']['call_s']:.1f} s, "
        f"**{s['over_read_and_fit']:.2f}x** read + fit (goal: at most 2x). Two processes: "
        f"**{s['speedup']:.2f}x** faster than one (goal: at least 1.7x on 2 cores).\n\n"
        + table(["processes", "compress s (in the call)", "command s (with start-up)", "fit s (sum over units)",
                 "CPU share of the least served process", "speed-up"], speed_rows)
        + f"\n\n**Memory**: layers of {m['experts']} experts ({m['hidden']} x {m['width']}), settings "
        f"{m['settings']}, 1 process. Peak resident memory stays flat while the checkpoint grows.\n\n"
        + table(["layers", "checkpoint MiB", "experts MiB", "peak RSS MiB", "above imports MiB", "read s", "fit s",
                 "compress s", "compress / (read + fit)"], memory_rows)
    )


def main(argv: list[str]) -> None:
    """The fresh-process worker: `read <folder>` or `compress <source> <output> <settings json>`."""
    torch.set_num_threads(1)
    if argv[0] in ("read", "compress"):
        result = read_all(Path(argv[1])) if argv[0] == "read" else compress(Path(argv[1]), Path(argv[2]),
                                                                             json.loads(argv[3]))
        print(json.dumps(result) + "\n", end="", flush=True)  # one write: the lines of two ranks do not interleave
    else:
        print(markdown(run(quick="--quick" in argv)))


if __name__ == "__main__":
    main(sys.argv[1:] or ["report"])
