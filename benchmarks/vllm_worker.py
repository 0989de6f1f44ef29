"""One model served by vLLM's offline engine, timed: run by vLLM's own python (benchmarks/vllm_serving.py starts it),
so it imports vLLM and torch only.

    VLLM_ALLOW_INSECURE_SERIALIZATION=1 python -c "import sys; from benchmarks.vllm_worker import main; \
        main(sys.argv[1:])" <folder> <repeats>
    VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1 python -c "..." <folder> 1 --profile <phase>

(from the repository's root; imported, not run as a script, so that the engine's process finds the function that
measures its tensors by its module's name.)

Prints one line, `RESULT <json>`: the seconds of each timed call (after a warm-up call of the same shape), the bytes of
the tensors the experts layers hold, and the engine process's resident memory after loading. The engine runs as vLLM
runs it by default, in a process of its own bound to its cores (the measurement of its tensors is sent there, which
needs VLLM_ALLOW_INSECURE_SERIALIZATION=1). `--profile` instead prints torch profiler's table of one call of that
phase (prefill, first_b1, b1, first_b16 or b16) by input shapes; the profiler sees the engine only when it runs in
this process, on one thread: without the thread limit its OpenMP regions wait on a core other work may hold.
"""

from __future__ import annotations

import json
import time

import torch
from vllm import LLM, SamplingParams

CONTEXT = 1024
PREFILL = (8, 512)  # prompts, tokens each: one new token each
DECODE_PROMPT, DECODE_TOKENS = 32, 33  # decode: DECODE_TOKENS new tokens against one, the difference is decoding
BATCHES = (1, 16)


def resident_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def held_tensors(obj: object, seen: set[int], storages: dict[int, int], depth: int = 0) -> None:
    """The storages of every tensor `obj` holds: a module's parameters and buffers, and whatever tensors vLLM's or our
    objects keep in their attributes (a method's prepacked weights, our int4 kernel's layout). Each storage once."""
    if depth > 10 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.is_mkldnn:  # oneDNN's own layout (moe_compress.cpu_matmul): no storage to read, its elements counted
            storages[id(obj)] = obj.numel() * torch.finfo(obj.dtype).bits // 8
        else:
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        return
    if isinstance(obj, torch.nn.Module):
        for tensor in [*obj.parameters(), *obj.buffers()]:
            held_tensors(tensor, seen, storages, depth + 1)
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("vllm", "moe_compress", "torch"):
        children = list(vars(obj).values())
    else:
        children = []
    for child in children:
        held_tensors(child, seen, storages, depth + 1)


def held_by_experts(model: torch.nn.Module) -> dict[str, float]:
    """Run in the engine's process: the bytes the experts layers hold, and that process's resident memory."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    storages: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            held_tensors(module, set(), storages)
    return {"experts_bytes": sum(storages.values()), "resident_mib": resident_mib()}


def prompts(count: int, length: int, generator: torch.Generator) -> list[dict]:
    return [{"prompt_token_ids": torch.randint(1, 256, (length,), generator=generator).tolist()} for _ in range(count)]


def timed(llm: LLM, batch: list[dict], new_tokens: int, repeats: int) -> list[float]:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(batch, params, use_tqdm=False)  # warm-up: first-call allocations and caches
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = llm.generate(batch, params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in out)
    return seconds


def phases(generator: torch.Generator) -> dict[str, tuple[list[dict], int]]:
    """Each timed call: its prompts and new tokens."""
    calls = {"prefill": (prompts(*PREFILL, generator), 1)}
    for batch in BATCHES:
        decode = prompts(batch, DECODE_PROMPT, generator)
        calls[f"first_b{batch}"] = (decode, 1)
        calls[f"b{batch}"] = (decode, DECODE_TOKENS)
    return calls


def main(argv: list[str]) -> None:
    folder, repeats = argv[0], int(argv[1])
    llm = LLM(model=folder, dtype="bfloat16", enforce_eager=True, max_model_len=CONTEXT, seed=0)
    calls = phases(torch.Generator().manual_seed(0))
    if "--profile" in argv:
        batch, new_tokens = calls[argv[argv.index("--profile") + 1]]
        timed(llm, batch, new_tokens, 0)
        with torch.profiler.profile(record_shapes=True) as profile:
            timed(llm, batch, new_tokens, 0)  # one call: its "warm-up"
        print(profile.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40))
        return
    result = llm.apply_model(held_by_experts)[0]
    result.update({name: timed(llm, batch, new_tokens, repeats) for name, (batch, new_tokens) in calls.items()})
    # the tokens each phase is credited with: the prompts' tokens, or the tokens decoded after the first
    result["tokens"] = {"prefill": PREFILL[0] * PREFILL[1],
                        **{f"b{batch}": batch * (DECODE_TOKENS - 1) for batch in BATCHES}}
    print("RESULT", json.dumps(result))

