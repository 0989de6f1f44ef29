"""Question 8, its reconstruction part: what the layer-wise reconstruction costs, against the calibrated compression
without it.

- testbeds: compress() of each bundled testbed at kept 0.3 (method=auto, calibrated on 256 windows of 256 bytes of
  the training split, the default number of calibration sequences), with the default reconstruction and without it
  (reconstruction.steps=0), median of 3 runs taken in turns, 1 torch thread; and the same for each testbed saved as a
  checkpoint folder and compressed by compress_checkpoint (statistics gathered anew in each run), where the statistics
  pass is also the weighing's forward.
- Qwen3-30B-A3B's shape, per experts module: a one-layer model with its MoE layer's shape (hidden 2048, 128 experts
  of width 768, top-8; random weights, since time does not depend on their values) compressed at kept 0.3 on 256
  random sequences of 256 tokens, one run: the calibration pass and the fits against the reconstruction of its block,
  each timed by the compression's own report.

`python -m benchmarks.reconstruction` runs it and stores it in benchmarks/results/calibration.json (§8);
`--device cuda` runs the same on a GPU (the testbeds in fp32 with all their torch threads, the Qwen3-shaped module in
bf16, as a user compresses it there) and stores it beside, under "reconstruction_cuda". `--count-kernels` counts, on
the CPU, the kernels a reconstruction step launches with the products the GPU's fp32 takes (experts.padded_bmm)
against the loop over the experts it replaced, stored under "kernel_counts". `--step-times` times, on the CPU, a
reconstruction step of each testbed's last block against a training step of the original block (and the same step in
bf16), stored under "step_times".
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from benchmarks.common import stored_part, table
from benchmarks.quality import CALIBRATION_LEN, calibration_windows
from moe_compress import CompressionConfig, ReconstructionConfig, compress, experts, find_experts
from moe_compress.calibration.sensitivity import frozen, token_sensitivity
from moe_compress.compression.reconstruction import outputs, training
from moe_compress.compression.from_folder import compress_checkpoint
from moe_compress.compression.config import RECONSTRUCTION_STEPS, CalibrationConfig
from moe_compress.testbed import TESTBEDS, load_testbed

TESTBED = dict(ratio=0.3, repeats=3, sequences=CalibrationConfig().num_sequences, testbeds=tuple(TESTBEDS))
QUICK_TESTBED = dict(ratio=0.3, repeats=1, sequences=4, testbeds=("testbed",), steps=5)
QWEN3 = dict(hidden=2048, experts=128, width=768, top_k=8, ratio=0.3, sequences=TESTBED["sequences"], length=256)
QUICK_QWEN3 = dict(hidden=64, experts=8, width=32, top_k=2, ratio=0.3, sequences=4, length=32, steps=5)


def synchronized(device: str) -> None:
    """Wait for the GPU's queued work, so that a clock read after it counts that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_compress(original, config: CompressionConfig, tokens: torch.Tensor,
                   device: str = "cpu") -> tuple[float, object]:
    """compress() of a copy of `original` (on `device`)."""
    model = copy.deepcopy(original)
    synchronized(device)
    start = time.perf_counter()
    report = compress(model, config, calibration=tokens, progress=False)
    synchronized(device)
    return time.perf_counter() - start, report


def steps_of(setting: dict) -> dict:
    return {"steps": setting["steps"]} if "steps" in setting else {}


def timed_folder(folder: Path, config: CompressionConfig, tokens: torch.Tensor) -> tuple[float, object]:
    """compress_checkpoint of `folder` into a fresh directory: its statistics gathered anew, none reused."""
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        report = compress_checkpoint(folder, Path(work) / "compressed", config, progress=False, calibration=tokens)
        return time.perf_counter() - start, report


def testbed_rows(setting: dict, device: str = "cpu") -> dict:
    """{testbed: {"in memory": row, "folder": row}}, each row the medians with and without the reconstruction, the
    model (or the checkpoint folder's layers and fits) on `device`."""
    rows = {}
    tokens = calibration_windows(setting["sequences"])
    configs = {"without": CompressionConfig(target_ratio=setting["ratio"], device=device,
                                            reconstruction=ReconstructionConfig(steps=0)),
               "with": CompressionConfig(target_ratio=setting["ratio"], device=device,
                                         reconstruction=ReconstructionConfig(**steps_of(setting)))}
    for name in setting["testbeds"]:
        original, _ = load_testbed(torch.float32, TESTBEDS[name])
        original.to(device)
        with tempfile.TemporaryDirectory() as saved:
            original.save_pretrained(saved)
            runs = {"in memory": lambda config: timed_compress(original, config, tokens, device),
                    "folder": lambda config: timed_folder(Path(saved), config, tokens)}
            rows[name] = {path: medians(run, configs, setting["repeats"]) for path, run in runs.items()}
        print(f"reconstruction cost: {name} {rows[name]}", file=sys.stderr, flush=True)
    return rows


def medians(run: Callable[[CompressionConfig], tuple[float, object]], configs: dict[str, CompressionConfig],
            repeats: int) -> dict:
    """Median seconds of run(config) for each of `configs`, in turns (the machine's load falls on both alike), the
    median seconds of the Adam steps, and with / without."""
    times: dict[str, list[float]] = {kind: [] for kind in configs}
    blocks = []
    for _ in range(repeats):
        for kind, config in configs.items():
            seconds, report = run(config)
            times[kind].append(seconds)
            if report.blocks:
                blocks.append(sum(b.seconds for b in report.blocks))
    row = {kind: statistics.median(t) for kind, t in times.items()}
    return {**row, "reconstruction_s": statistics.median(blocks), "ratio": row["with"] / row["without"]}


def qwen3_shaped(setting: dict, device: str = "cpu"):
    """A one-layer Qwen3-MoE model with Qwen3-30B-A3B's MoE layer shape, random weights (std 0.02), on `device`: in
    fp32 on the CPU, in bf16 on a GPU."""
    config = Qwen3MoeConfig(hidden_size=setting["hidden"], moe_intermediate_size=setting["width"],
                            num_experts=setting["experts"], num_experts_per_tok=setting["top_k"], norm_topk_prob=True,
                            num_hidden_layers=1, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                            intermediate_size=setting["width"], vocab_size=256, max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.model.layers[0].mlp.parameters():
            parameter.normal_(0, 0.02)
    return model.to(device, torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16)


def qwen3_tokens(setting: dict) -> torch.Tensor:
    """The random calibration token ids the Qwen3-shaped model compresses on, seeded."""
    return torch.randint(0, 256, (setting["sequences"], setting["length"]), generator=torch.Generator().manual_seed(0))


def qwen3_row(setting: dict, device: str = "cpu") -> dict:
    model = qwen3_shaped(setting, device)
    tokens = qwen3_tokens(setting)
    # uniform ranks: the global allocation's curves cost the same with or without reconstruction, so leaving them
    # out leaves the ratio at its least favourable to the reconstruction
    config = CompressionConfig(target_ratio=setting["ratio"], rank_allocation="uniform",
                               reconstruction=ReconstructionConfig(**steps_of(setting)))
    seconds, report = timed_compress(model, config, tokens, device)
    block, weights = report.blocks[0], weights_seconds(setting, device)
    without = seconds - block.seconds - weights
    return {"total_s": seconds, "fits_s": report.seconds, "reconstruction_s": block.seconds, "weights_s": weights,
            "without_s": without, "ratio": seconds / without,
            "block_error": [block.before, block.after], "steps": block.steps, "tokens": setting["sequences"] *
            setting["length"], "method": report.config.method}


def weights_seconds(setting: dict, device: str = "cpu") -> float:
    """The time of the pass that weighs the kept tokens (calibration/sensitivity.py), which compress() runs before
    the fits, on the model and tokens of qwen3_row, timed on its own."""
    model = qwen3_shaped(setting, device)
    tokens = qwen3_tokens(setting)
    blocks = {name: model.get_submodule(name.rpartition(".")[0]) for name, _ in find_experts(model)}
    synchronized(device)
    start = time.perf_counter()
    token_sensitivity(model, list(tokens.split(CalibrationConfig().batch_size)), blocks,
                      ReconstructionConfig().max_tokens)
    synchronized(device)
    return time.perf_counter() - start


def cost_part(quick: bool = False, testbeds: dict | None = None, qwen3: dict | None = None,
              device: str = "cpu") -> dict:
    """The part; `testbeds`, `qwen3`: rows measured before, kept (`--qwen3-only`, `--testbeds-only`). On the CPU
    with one torch thread, as every CPU section; on a GPU the host's threads left as they are."""
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    testbed, shape = (QUICK_TESTBED, QUICK_QWEN3) if quick else (TESTBED, QWEN3)
    rows = testbeds if testbeds is not None else testbed_rows(testbed, device)
    return {"testbed_setting": testbed, "testbeds": rows, "qwen3_setting": shape,
            "qwen3": qwen3 if qwen3 is not None else qwen3_row(shape, device), "fp32_products": FP32_PRODUCTS}


def folder_note(testbeds: dict) -> str:
    """How the checkpoint folder's rows differ from compress()'s, as measured."""
    quicker = all(r["folder"]["without"] < r["in memory"]["without"] for r in testbeds.values())
    first = ("A checkpoint folder's compression without reconstruction is the quicker of the two here: it gathers the "
             "statistics once and reads them back for the rank curves and for the fits, where compress() runs its "
             "statistics pass twice (holding every layer's Grams between them would not fit at real sizes)."
             if quicker else "Here a checkpoint folder's compression without reconstruction is the slower of the two, "
             "though it gathers the statistics once where compress() runs its statistics pass twice: it also loads "
             "the checkpoint layer by layer and writes the statistics to disk and reads them back.")
    return (first + " With reconstruction, its weighing column is also what the kept tokens' inputs cost to write "
            "beside the statistics and read back, and its backward through the layers runs each layer's forward "
            "again.")


GPU_TITLE = "Reconstruction on a GPU"  # the part's title in §8, beside the CPU's
# How the reconstruction's fp32 per-expert products run on a GPU, where torch's grouped_mm takes bf16 alone: stored
# with each run (parts stored before it was recorded ran the loop)
FP32_PRODUCTS = "padded"
GPU_FP32 = "On the GPU the reconstruction trains in fp32, where torch's grouped_mm kernel takes bf16 alone"
PADDED = "one zero-padded batched product over the experts (experts.padded_bmm)"
GPU_NOTES = {
    "loop": f"{GPU_FP32}, so each per-expert product of its steps was a loop over the experts: its Adam steps grew "
            "with their number (testbed_fine's 32 experts against testbed's 8), where the CPU's kernel takes fp32. "
            f"Those products have since become {PADDED}, not yet measured on a GPU.",
    "padded": f"{GPU_FP32}; each per-expert product of its steps runs as {PADDED}, where the CPU's kernel takes fp32."}


def markdown(part: dict, title: str = "Reconstruction") -> str:
    meta = part.get("meta", {})
    paths = {"in memory": "compress()", "folder": "checkpoint folder"}
    measured = [(f"{name}, {paths[path]}", r) for name, by_path in part["testbeds"].items()
                for path, r in by_path.items()]
    # a row measured without the Adam steps' own time (the GPU part's folder rows, see its command) shows "-" there
    rows = [[label, f"{r['without']:.1f}", f"{r['with']:.1f}",
             f"{r['reconstruction_s']:.1f}" if "reconstruction_s" in r else "-",
             f"{r['with'] - r['without'] - r['reconstruction_s']:.1f}" if "reconstruction_s" in r else "-",
             f"**{r['ratio']:.2f}x**"] for label, r in measured]
    ratios = [r["ratio"] for _, r in measured]
    q = part.get("qwen3")
    if q is not None:
        s = part["qwen3_setting"]
        rows.append([f"Qwen3-30B-A3B's shape, one experts module ({s['experts']} x {s['width']} x {s['hidden']}, "
                     f"top-{s['top_k']}; {q['tokens']} tokens)", f"{q['without_s']:.1f}", f"{q['total_s']:.1f}",
                     f"{q['reconstruction_s']:.1f}", f"{q['weights_s']:.1f}" if "weights_s" in q else "-",
                     f"**{q['ratio']:.2f}x**"])
        ratios.append(q["ratio"])
    met = [row[0].split(" (")[0] for row, ratio in zip(rows, ratios) if ratio <= 2]
    missed = [row[0].split(" (")[0] for row, ratio in zip(rows, ratios) if ratio > 2]
    shape = (f"At Qwen3-30B-A3B's shape the module's fits take {q['fits_s']:.0f} s of the {q['without_s']:.0f} s "
             f"({q['method']}); its block's output error went {q['block_error'][0]:.3f} -> {q['block_error'][1]:.3f} "
             "on random weights and inputs." if q is not None else part.get("qwen3_note", ""))
    if q is not None and "date" in q:  # kept from an earlier run
        shape += f" That row is kept from the run of {q['date']} (`--testbeds-only`)."
    where = ", ".join(meta[key] for key in ("date", "machine") if key in meta)  # parts may run on another machine
    return (f"**{title}**, measured with `{meta.get('command', 'python -m benchmarks.reconstruction')}`"
            f" ({where}): compress() at kept {part['testbed_setting']['ratio']} with calibration data "
            f"(method=auto), with the default reconstruction (the pass that weighs the kept tokens by the loss's "
            f"gradient, then {RECONSTRUCTION_STEPS} Adam steps a block of {ReconstructionConfig().batch_tokens} "
            f"tokens) and without it, and compress_checkpoint of the testbed saved as a folder likewise (statistics "
            "gathered anew in every run; its statistics pass is also the weighing's forward, so its weighing is a "
            f"backward through the layers); testbeds: median of {part['testbed_setting']['repeats']} runs in turns, "
            "the weighing read as what the run with it took beyond the one without and the Adam steps; "
            "Qwen3-30B-A3B's shape: one run of a one-layer model with its MoE layer (uniform ranks), the calibration "
            "pass and the fits timed as the whole run less the reconstruction and less the weighing pass, timed on "
            "its own. Goal: at most 2x the calibrated compression without it.\n\n"
            + table(["model, path", "without s", "with s", "Adam steps s", "weighing s", "with / without"], rows)
            + f"\n\nWithin the goal: {'; '.join(met) or 'none'}. Missed: {'; '.join(missed) or 'none'}. {shape} "
            + folder_note(part["testbeds"]) + gpu_note(part))


def gpu_note(part: dict) -> str:
    """How a GPU part's fp32 products ran; nothing for the CPU's."""
    if part.get("meta", {}).get("machine", "CPU").startswith("CPU"):
        return ""
    return " " + GPU_NOTES[part.get("fp32_products", "loop")]


class KernelCount(TorchDispatchMode):
    """How many aten operations that compute run within the block (on a GPU, a kernel launch each): views, which
    only describe memory, left out."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not (func.is_view or func is torch.ops.aten._unsafe_view.default)
        return func(*args, **(kwargs or {}))


def step_kernels(block: torch.nn.Module, x: torch.Tensor) -> int:
    """The aten operations that compute (KernelCount) in one reconstruction step's forward and backward of `block`
    on token inputs x [N, H], with the products the GPU's fp32 takes (torch's grouped_mm kernel refusing the dtype,
    as it does there)."""
    with mock.patch.object(experts, "kernel_takes", lambda x: False), KernelCount() as counted:
        loss = outputs(block, x).square().mean()
        loss.backward()
    return counted.count


def last_block(model: torch.nn.Module, calibration: torch.Tensor, tokens: torch.Tensor, ratio: float) -> tuple:
    """`model` compressed in place at kept `ratio` on `calibration` (no reconstruction): its last MoE block, the
    compressed experts module in it, and the block's inputs [N, H] and top-k routing [N, K] on the token ids
    `tokens`."""
    experts_name = find_experts(model)[-1][0]
    config = CompressionConfig(target_ratio=ratio, reconstruction=ReconstructionConfig(steps=0))
    compress(model, config, calibration=calibration, progress=False)
    block, compressed = model.get_submodule(experts_name.rpartition(".")[0]), model.get_submodule(experts_name)
    seen, routed = [], []
    hooks = [block.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach())),
             compressed.register_forward_pre_hook(lambda module, args: routed.append(args[1]))]  # (x, top-k index, ..)
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    return block, compressed, seen[0].reshape(-1, seen[0].shape[-1]), routed[0]


def block_kernels(model: torch.nn.Module, calibration: torch.Tensor, tokens: torch.Tensor, ratio: float) -> dict:
    """{"experts": their count, "padded": kernels, "loop": kernels}: one reconstruction step of the last MoE block of
    `model`, compressed at kept `ratio` on `calibration` (no reconstruction), on the block's inputs from the token ids
    `tokens`, with the padded batched product and with the loop over the experts it replaced."""
    block, compressed, x, routed = last_block(model, calibration, tokens, ratio)
    # the busiest expert's pairs on the step's tokens: what the padded stack grows with
    busiest = torch.bincount(routed.reshape(-1), minlength=model.config.num_experts).max().item()
    with training(block, compressed, router=False):
        found = {"experts": model.config.num_experts, "busiest": busiest, "padded": step_kernels(block, x)}
        with mock.patch.object(experts, "padded_bmm", lambda *args: None):
            found["loop"] = step_kernels(block, x)
    return found


def kernel_counts(setting: dict) -> dict:
    """block_kernels of each testbed (calibrated on 32 windows, a step's tokens from setting["sequences"]) and of a
    one-layer model with Qwen3-30B-A3B's experts and routing (setting["qwen3"]: its widths cut, since a count does
    not depend on them), calibrated on its step's tokens."""
    counts = {}
    for name in setting["testbeds"]:
        model, _ = load_testbed(torch.float32, TESTBEDS[name])
        counts[name] = block_kernels(model, calibration_windows(32), calibration_windows(setting["sequences"]),
                                     setting["ratio"])
    shape = setting["qwen3"]
    counts["qwen3"] = block_kernels(qwen3_shaped(shape), qwen3_tokens(shape), qwen3_tokens(shape), setting["ratio"])
    return {"setting": setting, "counts": counts}


# a step's 1,024 tokens: 4 calibration windows (4 sequences of 256 tokens for the Qwen3-shaped model); Qwen3-30B-A3B's
# 128 experts, top-8, at small widths
KERNELS = dict(ratio=0.3, sequences=4, testbeds=tuple(TESTBEDS),
               qwen3=dict(hidden=64, experts=128, width=32, top_k=8, sequences=4, length=256))


def kernels_markdown(part: dict) -> str:
    """The kernel counts, as a note under the GPU part."""
    meta, counts, setting = part["meta"], part["counts"], part["setting"]
    q, busiest = setting["qwen3"], counts["qwen3"]["busiest"]
    pairs, tokens = q["sequences"] * q["length"] * q["top_k"], setting["sequences"] * CALIBRATION_LEN
    real = q["experts"] * busiest * QWEN3["hidden"] * 4 / 2**30  # its largest padded stack at hidden 2048, fp32
    labels = {"qwen3": f"a one-layer model with Qwen3-30B-A3B's routing ({q['experts']} experts, top-{q['top_k']}, "
                       f"random weights, the busiest expert taking {busiest} pairs of the step's "
                       f"{pairs:,}; its widths cut to {q['hidden']} x {q['width']}, "
                       "since a count does not depend on them while the padded stack stays within "
                       f"experts.PADDED_BYTES: at hidden {QWEN3['hidden']} this routing's largest would be "
                       f"{real:.2f} GiB)"}
    each = "; ".join(f"{labels.get(name, name + ' (' + str(c['experts']) + ' experts)')}: {c['padded']:,} against "
                     f"{c['loop']:,} ({c['loop'] / c['padded']:.1f}x)" for name, c in counts.items())
    return (f"**Kernels a reconstruction step launches on a GPU**, counted on the CPU with the products the GPU's fp32 "
            f"takes (`{meta['command']}`, {meta['date']}): one step's forward and backward of the last MoE block, "
            f"kept {setting['ratio']}, on {tokens:,} tokens, with the padded batched product "
            "against the loop over the experts it replaced, in aten operations that compute (views left out): "
            f"{each}. A count, not a time: where a GPU's small kernels are bound by their launches, a step's time "
            "follows it.")


def step_seconds(block: torch.nn.Module, params: list[torch.nn.Parameter], batches: list[torch.Tensor],
                 steps: int) -> float:
    """Median seconds of a training step of `block` on the token inputs `batches` (in turn), as the reconstruction
    takes one: forward, a squared loss, backward, torch's fused Adam on `params`; the first two steps left out."""
    optimizer = torch.optim.Adam(params, lr=1e-3, fused=True)
    times = []
    for step in range(steps + 2):
        x = batches[step % len(batches)]
        start = time.perf_counter()
        loss = outputs(block, x).float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def block_steps(name: str, setting: dict) -> dict:
    """Milliseconds of a step on a testbed's last MoE block, on its inputs from calibration windows: the original
    block, the compressed one (kept setting["ratio"], no reconstruction) as the reconstruction trains it (fp32, its
    stored tensors trainable) and the same in bf16; setting["rounds"] rounds of setting["steps"] steps each, in turns
    in this process, the median of the rounds' medians."""
    model, _ = load_testbed(torch.float32, TESTBEDS[name])
    parent, _, slot = find_experts(model)[-1][0].rpartition(".")
    plain = copy.deepcopy(model.get_submodule(parent))  # the original block, trained on its experts' weights
    block, compressed, x, _ = last_block(model, calibration_windows(32), calibration_windows(setting["sequences"]),
                                         setting["ratio"])
    batches = list(x.split(setting["batch_tokens"]))
    bf16 = copy.deepcopy(block).to(torch.bfloat16)
    trained = {"original": list(plain.get_submodule(slot).parameters()),
               "bf16": list(bf16.get_submodule(slot).parameters())}
    rounds: dict[str, list[float]] = {"original": [], "compressed": [], "bf16": []}
    with training(block, compressed, router=False) as params, frozen(bf16), frozen(plain):
        for p in [*trained["original"], *trained["bf16"]]:
            p.requires_grad_(True)
        for _ in range(setting["rounds"]):
            rounds["original"].append(step_seconds(plain, trained["original"], batches, setting["steps"]))
            rounds["compressed"].append(step_seconds(block, params, batches, setting["steps"]))
            rounds["bf16"].append(step_seconds(bf16, trained["bf16"], [b.bfloat16() for b in batches],
                                               setting["steps"]))
    return {kind: 1e3 * statistics.median(found) for kind, found in rounds.items()}


def step_times(setting: dict) -> dict:
    torch.set_num_threads(1)
    return {"setting": setting, "testbeds": {name: block_steps(name, setting) for name in setting["testbeds"]}}


# a step's 1,024 tokens of the last block's inputs on 16 calibration windows (4 batches, in turn)
STEPS = dict(ratio=0.3, sequences=16, batch_tokens=1024, steps=40, rounds=3, testbeds=tuple(TESTBEDS))
PARITY = 1.15  # the noise of a shared machine's step times: a compressed step within it of the original's is at parity
QUICK_STEPS = dict(ratio=0.3, sequences=4, batch_tokens=512, steps=2, rounds=1, testbeds=("testbed",))


def steps_markdown(part: dict) -> str:
    """The step times, as a note under the CPU part."""
    meta, setting = part["meta"], part["setting"]
    found = part["testbeds"].values()
    each = "; ".join(f"{name}: {t['compressed']:.1f} ms against {t['original']:.1f} "
                     f"({t['compressed'] / t['original']:.2f}x), in bf16 {t['bf16']:.1f} ms "
                     f"({t['bf16'] / t['compressed']:.2f}x the fp32 step's time)"
                     for name, t in part["testbeds"].items())
    parity = max(t["compressed"] / t["original"] for t in found) <= PARITY
    verdict = ("So a reconstruction step costs about what a training step of the original block costs." if parity
               else "So a reconstruction step costs more than a training step of the original block.")
    return (f"**A reconstruction step against a training step of the original block** (`{meta['command']}`, "
            f"{meta['date']}, {meta['machine']}): one step (forward, a squared loss, backward, fused Adam) of the "
            f"last MoE block on {setting['batch_tokens']:,} of its inputs, the compressed block (kept "
            f"{setting['ratio']}) as the reconstruction trains it in fp32 against the original block with its "
            f"experts' weights trainable, and the compressed block in bf16; median of {setting['rounds']} rounds of "
            f"{setting['steps']} steps in turns, 1 torch thread: {each}. {verdict}")


def main() -> None:
    quick = "--quick" in sys.argv
    if "--step-times" in sys.argv:
        part = stored_part("calibration", "step_times", "python -m benchmarks.reconstruction --step-times",
                           lambda: step_times(QUICK_STEPS if quick else STEPS), store=not quick)
        print(steps_markdown(part))
        return
    if "--count-kernels" in sys.argv:
        part = stored_part("calibration", "kernel_counts", "python -m benchmarks.reconstruction --count-kernels",
                           lambda: kernel_counts(KERNELS), store=not quick)
        print(kernels_markdown(part))
        return
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
    key = "reconstruction" if device == "cpu" else f"reconstruction_{torch.device(device).type}"
    title = "Reconstruction" if device == "cpu" else GPU_TITLE
    path = Path(__file__).parent / "results" / "calibration.json"
    kept = {}
    if "--qwen3-only" in sys.argv:  # the testbeds' rows of the last run kept
        kept["testbeds"] = json.loads(path.read_text())[key]["testbeds"]
    if "--testbeds-only" in sys.argv:  # the Qwen3-shaped row of the last run kept, with its date
        stored = json.loads(path.read_text())[key]
        kept["qwen3"] = {"date": stored["meta"]["date"], **stored["qwen3"]}
    if "--weights-only" in sys.argv:  # the stored run's Qwen3-shaped row, with its weighing pass timed alone
        stored = json.loads(path.read_text())
        q = stored[key]["qwen3"]
        if device == "cpu":
            torch.set_num_threads(1)
        q["weights_s"] = weights_seconds(stored[key]["qwen3_setting"], device)
        q["without_s"] = q["total_s"] - q["reconstruction_s"] - q["weights_s"]
        q["ratio"] = q["total_s"] / q["without_s"]
        stored[key]["meta"]["command"] += " (its weighing pass timed alone by --weights-only)"
        path.write_text(json.dumps(stored, indent=1, default=str))
        print(markdown(stored[key], title))
        return
    flags = {"testbeds": " --qwen3-only", "qwen3": " --testbeds-only"}  # the rows each flag keeps
    command = "python -m benchmarks.reconstruction" + "".join(flags[k] for k in kept) + (
        f" --device {device}" if device != "cpu" else "")
    part = stored_part("calibration", key, command, lambda: cost_part(quick, **kept, device=device), store=not quick)
    print(markdown(part, title))


if __name__ == "__main__":
    main()
