"""Question 9: how fast vLLM serves the compressed testbed (through our plugin, moe_compress/vllm_plugin.py) against
the original, with the same settings.

The fine-grained testbed and its compression to 0.3 of the expert parameters, both in float32, eager mode, through
vLLM's offline LLM engine: a batch of prompts, each decoded greedily to a fixed number of new tokens (end of text
ignored), timed after a warm-up batch. Each model runs in its own vLLM process, in turns (original, compressed,
original, ...), so that a noisy machine slows both alike; the figure is the median over every timed batch.

vLLM lives in an environment of its own (see `.ci/vllm-check`): MOE_COMPRESS_VLLM_PYTHON names its python, default
.venv-vllm/bin/python.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import moe_compress
from benchmarks.common import table
from moe_compress.testbed import FINE_TESTBED_DIR, load_testbed

ROOT = Path(__file__).parent.parent
PROMPTS, NEW_TOKENS, TARGET_RATIO = 16, 64, 0.3
# run by vLLM's python: one model, a warm-up batch, then timed batches; prints the seconds of each
GENERATE = '''
import json, sys, time
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    folder, prompts, new_tokens, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    batch = [f"{name}:\\n" for name in ("ROMEO", "JULIET", "KING RICHARD III", "First Citizen")] * (prompts // 4)
    llm.generate(batch, params, use_tqdm=False)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = llm.generate(batch, params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
        assert sum(len(o.outputs[0].token_ids) for o in out) == prompts * new_tokens
    print("SECONDS", json.dumps(seconds))
'''


def vllm_python() -> Path:
    python = Path(os.environ.get("MOE_COMPRESS_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
    if not python.exists():
        raise FileNotFoundError(f"no vLLM environment at {python}; build it with `.ci/vllm-check` (or set "
                                "MOE_COMPRESS_VLLM_PYTHON), or leave vllm_serving out of --only")
    return python


def timed_batches(python: Path, script: Path, folder: Path, repeats: int) -> list[float]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("OMP_NUM_THREADS", None)  # vLLM's CPU backend binds its own threads
    done = subprocess.run([str(python), str(script), str(folder), str(PROMPTS), str(NEW_TOKENS), str(repeats)],
                          capture_output=True, text=True, env=env, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("SECONDS"))
    return json.loads(line.removeprefix("SECONDS"))


def run(quick: bool = False) -> dict:
    if quick:  # the smoke run has no vLLM environment; the real check is tests/test_vllm_serving.py
        return {"skipped": "quick run: vLLM is not run"}
    python = vllm_python()
    version = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True, check=True).stdout.split()[-1]
    with tempfile.TemporaryDirectory() as work:
        model, tokenizer = load_testbed(path=FINE_TESTBED_DIR)
        report = moe_compress.compress(model, moe_compress.CompressionConfig(target_ratio=TARGET_RATIO))
        compressed = moe_compress.save_compressed(model, Path(work) / "compressed", tokenizer=tokenizer)
        script = Path(work) / "generate.py"
        script.write_text(GENERATE)
        folders = {"original": FINE_TESTBED_DIR, "compressed": compressed}
        seconds: dict[str, list[float]] = {name: [] for name in folders}
        for _ in range(2):
            for name, folder in folders.items():
                seconds[name] += timed_batches(python, script, folder, repeats=3)
    tokens = PROMPTS * NEW_TOKENS
    return {"vllm": version, "prompts": PROMPTS, "new_tokens": NEW_TOKENS, "kept_fraction": report.kept_fraction,
            "seconds": seconds, "tokens_per_second": {n: tokens / statistics.median(s) for n, s in seconds.items()}}


def markdown(result: dict) -> str:
    if "skipped" in result:
        return result["skipped"]
    rate = result["tokens_per_second"]
    rows = [[name, f"{rate[name]:.1f}", f"{statistics.median(result['seconds'][name]):.2f}",
             len(result["seconds"][name])] for name in rate]
    return (f"vLLM {result['vllm']} (vllm-cpu), float32, eager, the fine-grained testbed and its compression to "
            f"{result['kept_fraction']:.3f} of the expert parameters (served by the moe-compress plugin): "
            f"{result['prompts']} prompts decoded greedily to {result['new_tokens']} new tokens each, in one batch. "
            "Median over the timed batches, the two models run in turns, each in its own vLLM process (vLLM's CPU "
            "backend binds its worker to one core of the two and keeps the other for itself).\n\n"
            + table(["model", "generated tokens/s", "batch s (median)", "timed batches"], rows)
            + f"\n\nThe compressed model runs at {rate['compressed'] / rate['original']:.2f}x the original's speed. "
            "The plugin's forward is plain torch (cores once per token, rank-r work per routed pair); the original "
            "runs vLLM's own unquantized MoE method.")
