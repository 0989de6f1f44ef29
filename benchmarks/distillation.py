"""Question 5: does a short CPU distillation win back the quality zero-shot compression lost?

The testbed compressed to about 0.3 of its expert parameters (default fit) is distilled from the original for a few
minutes on CPU; held-out loss on the full validation split before, after, and of the teacher, and the loss curve.
Beside it: the same student distilled from 8-bit and 4-bit teachers, and (`--quantized-student`, a part that runs
alone) a student whose experts are stored as 4-bit integers, trained quantization-aware, outside its experts, or both,
at two learning rates.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time

import torch
from transformers import TrainingArguments

from benchmarks.common import part_cli, plot_to, stored_part, table
from benchmarks.quality import calibration_windows
from moe_compress import CompressionConfig, ModuleSpec, ReconstructionConfig, compress, find_experts
from moe_compress.compression.config import CalibrationConfig
from moe_compress.compression.in_memory import compress_as
from moe_compress.discovery import projection_names
from moe_compress.data import DataConfig
from moe_compress.distill import DistillationConfig, distill, load_teacher, teacher_memory
from moe_compress.testbed import TESTBEDS, heldout_loss, load_testbed, read_split

FULL = dict(ratio=0.3, steps=300, batch=16, seq_len=256, lr=1e-4, alpha=0.9, eval_steps=50, eval_batch=16,
            max_tokens=None)
# the smoke run evaluates the whole validation split once: in batches of 64, not 2 (872 forwards took 35 s)
QUICK = dict(ratio=0.3, steps=4, batch=2, seq_len=64, lr=1e-4, alpha=0.9, eval_steps=4, eval_batch=64, max_tokens=4096)
TEACHER_TESTBED = "testbed_fine"
QUANTIZED_STUDENT = dict(kept=0.5, bits=4, steps=150, batch=8, seq_len=128, alpha=0.9, lrs=(1e-4, 1e-3),
                         trains=("wrappers+cores", "outside-experts", "all"), calibration_sequences=64, max_tokens=None)
QUICK_QUANTIZED_STUDENT = dict(QUANTIZED_STUDENT, steps=2, batch=2, seq_len=32, lrs=(1e-3,), trains=("all",),
                               calibration_sequences=4, max_tokens=4096)
TRAINS = {"wrappers+cores": "the experts (quantization-aware)", "outside-experts": "all but the experts",
          "all": "both"}


def training_args(s: dict, lr: float, **extra) -> TrainingArguments:
    """The benchmark's Trainer settings: s["steps"] steps of s["batch"] sequences at `lr`, cosine, 5% warm-up, on CPU,
    nothing saved."""
    return TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="distill-bench-"), max_steps=s["steps"],
        per_device_train_batch_size=s["batch"], learning_rate=lr, lr_scheduler_type="cosine",
        warmup_steps=s["steps"] // 20, save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        logging_steps=max(1, s["steps"] // 30), **extra)


def distilled(testbed: str, teacher: torch.nn.Module, s: dict) -> dict:
    """The testbed compressed to kept s["ratio"] (default fit) and distilled from `teacher`: losses and seconds."""
    student, tokenizer = load_testbed(path=TESTBEDS[testbed])
    compress(student, CompressionConfig(target_ratio=s["ratio"]), progress=False)
    loss = lambda model: heldout_loss(model, read_split("validation"), max_tokens=s["max_tokens"])
    before = loss(student)
    args = training_args(s, s["lr"])
    start = time.perf_counter()
    distill(student, teacher, tokenizer, DataConfig(seq_len=s["seq_len"]), DistillationConfig(alpha=s["alpha"]), args)
    seconds = time.perf_counter() - start
    return {"before": before, "after": loss(student), "seconds_per_step": seconds / s["steps"]}


def teachers(quick: bool) -> dict:
    """Full, 8-bit and 4-bit teachers of the fine-grained testbed, each distilling the same compressed student."""
    s = QUICK if quick else FULL
    original = heldout_loss(load_teacher(TEACHER_TESTBED, dtype="float32"), read_split("validation"),
                            max_tokens=s["max_tokens"])
    rows = {}
    for quantization in (None, "4bit") if quick else (None, "8bit", "4bit"):
        teacher = load_teacher(TEACHER_TESTBED, quantization, dtype="float32")
        memory = teacher_memory(load_teacher(TEACHER_TESTBED, quantization))  # resident as it would run: bf16
        rows[quantization or "full"] = {**distilled(TEACHER_TESTBED, teacher, s), "resident": memory.resident,
                                        "bf16": memory.bf16}
    full = rows["full"]
    for row in rows.values():  # what each recovers, against what the full teacher recovers
        row["recovered"] = row["before"] - row["after"]
        row["share_of_full"] = row["recovered"] / (full["before"] - full["after"])
    return {"testbed": TEACHER_TESTBED, "original": original, "rows": rows}


def quantized_student(quick: bool) -> dict:
    """The fine-grained testbed compressed (calibrated default) with its experts stored as integers, distilled for the
    same steps from the full teacher with each choice of what trains and each learning rate."""
    s = QUICK_QUANTIZED_STUDENT if quick else QUANTIZED_STUDENT
    torch.set_num_threads(1)
    teacher, tokenizer = load_testbed(path=TESTBEDS[TEACHER_TESTBED])
    loss = lambda model: heldout_loss(model, read_split("validation"), max_tokens=s["max_tokens"])
    student = copy.deepcopy(teacher)
    report = compress(student, CompressionConfig(target_ratio=s["kept"], bits=s["bits"]),
                      calibration=calibration_windows(s["calibration_sequences"]), progress=False)
    rows = []
    for lr in s["lrs"]:
        for train in s["trains"]:
            model = copy.deepcopy(student)
            args = training_args(s, lr)
            start = time.perf_counter()
            distill(model, teacher, tokenizer, DataConfig(seq_len=s["seq_len"]),
                    DistillationConfig(alpha=s["alpha"], train=train), args)
            rows.append({"train": train, "lr": lr, "after": loss(model),
                         "seconds_per_step": (time.perf_counter() - start) / s["steps"]})
    return {"setting": s, "bits": report.bits_per_weight, "kept_fraction": report.kept_fraction,
            "original": loss(teacher), "before": loss(student), "rows": rows}


def reconstructed(quick: bool) -> dict:
    """The fine-grained testbed compressed to kept s["ratio"] with calibration data, by its closed-form fit alone and
    with the layer-wise reconstruction, each distilled for the same steps from the full teacher; and the control: the
    original itself trained by the same recipe for the same steps on the same data (on a small model that is not fully
    trained, in-domain distillation also trains further)."""
    s = QUICK if quick else FULL
    torch.set_num_threads(1)
    teacher, tokenizer = load_testbed(path=TESTBEDS[TEACHER_TESTBED])
    loss = lambda model: heldout_loss(model, read_split("validation"), max_tokens=s["max_tokens"])
    steps = {"steps": 5} if quick else {}
    students = {"closed-form fit": ReconstructionConfig(steps=0), "with reconstruction": ReconstructionConfig(**steps)}
    rows = {}
    for name, reconstruction in [*students.items(), ("original (control)", None)]:
        student = copy.deepcopy(teacher)
        if reconstruction is not None:
            compress(student, CompressionConfig(target_ratio=s["ratio"], reconstruction=reconstruction),
                     calibration=calibration_windows(4 if quick else CalibrationConfig().num_sequences), progress=False)
        else:  # every expert as it is, in floats (the dense form: its own core), so that distill() trains the
            # original's experts as it trains the students' expert tensors; the logits are the original's
            specs = {name: ModuleSpec("dense", dict.fromkeys(projection_names(experts), 0))
                     for name, experts in find_experts(student)}
            compress_as(student, specs, CompressionConfig(method="quantize", bits=8), progress=False)
        before = loss(student)
        start = time.perf_counter()
        distill(student, teacher, tokenizer, DataConfig(seq_len=s["seq_len"]), DistillationConfig(alpha=s["alpha"]),
                training_args(s, s["lr"]))
        rows[name] = {"before": before, "after": loss(student),
                      "seconds_per_step": (time.perf_counter() - start) / s["steps"]}
    return {"testbed": TEACHER_TESTBED, "setting": s, "rows": rows}


def run(quick: bool = False) -> dict:
    return {**trained(quick), "teachers": teachers(quick), "reconstructed": reconstructed(quick)}


def trained(quick: bool = False) -> dict:
    s = QUICK if quick else FULL
    teacher, tokenizer = load_testbed()
    student, _ = load_testbed()
    report = compress(student, CompressionConfig(target_ratio=s["ratio"]), progress=False)
    text = read_split("validation")
    loss = lambda model: heldout_loss(model, text, max_tokens=s["max_tokens"])
    teacher_loss, before = loss(teacher), loss(student)
    args = training_args(s, s["lr"], per_device_eval_batch_size=s["eval_batch"], eval_strategy="steps",
                         eval_steps=s["eval_steps"])
    start = time.perf_counter()
    trainer = distill(student, teacher, tokenizer, DataConfig(seq_len=s["seq_len"]),
                      DistillationConfig(alpha=s["alpha"]), args)
    seconds = time.perf_counter() - start
    after = loss(student)
    return {"setting": s, "kept_fraction": report.kept_fraction, "teacher": teacher_loss, "before": before,
            "after": after, "gap_closed": (before - after) / (before - teacher_loss), "seconds": seconds,
            "history": trainer.state.log_history}


def plot(result: dict, path: str) -> None:
    history = result["history"]
    title = f"Distilling the testbed compressed to {result['kept_fraction']:.2f} of its expert parameters"
    with plot_to(path, title, "step", "nats per byte") as ax:
        for key, label in (("loss", "train loss (alpha KL T^2 + (1-alpha) CE)"), ("ce", "train CE"),
                           ("eval_ce", "held-out CE (eval batches)")):
            points = [(h["step"], h[key]) for h in history if key in h]
            if points:
                ax.plot(*zip(*points), marker="." if key.startswith("eval") else None, label=label)
        ax.axhline(result["teacher"], color="gray", linestyle="--", label="teacher held-out loss")


def teachers_markdown(found: dict) -> str:
    rows = [[name, f"{row['resident'] / 2**20:,.2f} MiB ({row['resident'] / row['bf16']:.2f}x)",
             f"{row['before']:.4f}", f"{row['after']:.4f}", f"{row['recovered']:+.4f}",
             f"{100 * row['share_of_full']:.0f}%", f"{row['seconds_per_step']:.2f}"]
            for name, row in found["rows"].items()]
    full, four = found["rows"]["full"], found["rows"]["4bit"]  # the smoke run has no 8-bit row
    return (f"**Quantized teachers** (distill.teacher_quantization): the {found['testbed']} testbed at kept 0.3, "
            f"distilled for the same steps from each teacher; the original's held-out loss {found['original']:.4f}. "
            "Resident memory as the teacher runs (loaded in the checkpoint's bf16), against its bf16 bytes.\n\n"
            + table(["teacher", "resident memory", "student before", "student after", "recovered",
                     "share of the full teacher's recovery", "s / step"], rows)
            + f"\n\nThe 4-bit teacher recovers {100 * four['share_of_full']:.0f}% of what the full one does "
            f"(goal: at least 90%), at {four['seconds_per_step'] / full['seconds_per_step']:.2f}x its step time.")


def quantized_student_markdown(found: dict) -> str:
    s, base = found["setting"], found["original"]
    rows = [[TRAINS[row["train"]], f"{row['lr']:g}", f"{row['after'] - base:+.4f}",
             f"{(found['before'] - row['after']) / (found['before'] - base):.0%}", f"{row['seconds_per_step']:.2f}"]
            for row in found["rows"]]
    best = min(found["rows"], key=lambda row: row["after"])
    meta = found.get("meta")  # the smoke run prints the part without one
    ran = "" if meta is None else (f" Machine: {meta['machine']}. Command: `{meta['command']}` "
                                   f"({meta['seconds']:.0f} s, {meta['date']}).")
    return (f"**A quantized student** (run alone).{ran} The {TEACHER_TESTBED} testbed compressed "
            f"(calibrated default) to kept {found['kept_fraction']:.2f} with every stored tensor in {s['bits']}-bit "
            f"integers, {found['bits']:.2f} bits per expert weight; its held-out loss increase over the original "
            f"({base:.4f}) is {found['before'] - base:+.4f} zero-shot. Distilled for {s['steps']} steps of "
            f"{s['batch']} x {s['seq_len']} bytes (cosine, alpha {s['alpha']}) from the full teacher, training:\n\n"
            + table(["what trains", "learning rate", "increase after", "of the zero-shot increase, recovered",
                     "s / step"], rows)
            + f"\n\nLowest: {TRAINS[best['train']]} at learning rate {best['lr']:g}.")


def reconstructed_markdown(found: dict) -> str:
    """The students before and after, against the original and against the control; the share of the gap to the
    control that distillation closes from the closed-form fit, alone and after reconstruction."""
    s, rows = found["setting"], found["rows"]
    original, control = rows["original (control)"]["before"], rows["original (control)"]["after"]
    closed = rows["closed-form fit"]["before"]
    table_rows = [[name, f"{row['before'] - original:+.4f}", f"{row['after'] - original:+.4f}",
                   f"{row['after'] - control:+.4f}", f"{(closed - row['after']) / (closed - control):.0%}"]
                  for name, row in rows.items() if name != "original (control)"]
    table_rows.append(["original (control)", "+0.0000", f"{control - original:+.4f}", "+0.0000", "-"])
    alone, both = (closed - rows[k]["after"] for k in ("closed-form fit", "with reconstruction"))
    meta = found.get("meta")  # the smoke run prints the part without one
    ran = "" if meta is None else (f" (run as its own part; machine: {meta['machine']}; command: `{meta['command']}`, "
                                   f"{meta['seconds']:.0f} s, {meta['date']})")
    return (f"**Reconstruction, then distillation**{ran}: the {found['testbed']} testbed at kept {s['ratio']} with "
            f"calibration data (the default fit, closed form alone or with the layer-wise reconstruction), each "
            f"distilled {s['steps']} steps as above from the full teacher; the control is the original trained by the "
            f"same recipe for the same steps on the same data. Loss increases over the original's held-out loss "
            f"({original:.4f}) and over the control's after training ({control:.4f}):\n\n"
            + table(["student", "increase before", "increase after", "after, over the control",
                     "gap to the control closed"], table_rows)
            + f"\n\nFrom the closed-form fit's loss, reconstruction then distillation closes "
            f"{both / (closed - control):.0%} of the gap to the control, distillation alone "
            f"{alone / (closed - control):.0%}. The control itself ends "
            f"{control - original:+.4f} from where the original started: read recovery against it, not against the "
            "original's starting loss.")


def markdown(result: dict) -> str:
    parts = [trained_markdown(result), teachers_markdown(result["teachers"])]
    if "reconstructed" in result:
        parts.append(reconstructed_markdown(result["reconstructed"]))
    if "quantized_student" in result:
        parts.append(quantized_student_markdown(result["quantized_student"]))
    return "\n\n".join(parts)


def trained_markdown(result: dict) -> str:
    s = result["setting"]
    rows = [["teacher (original)", f"{result['teacher']:.4f}"],
            ["compressed, zero-shot", f"{result['before']:.4f}"],
            [f"compressed, distilled {s['steps']} steps", f"{result['after']:.4f}"]]
    return (f"Kept fraction {result['kept_fraction']:.3f}; {s['steps']} steps of {s['batch']} x {s['seq_len']} bytes, "
            f"lr {s['lr']}, alpha {s['alpha']}, T 2, wrappers and cores trained: {result['seconds']:.0f} s on CPU.\n\n"
            + table(["model", "held-out loss (nats per byte)"], rows)
            + f"\n\nThe distillation closes **{100 * result['gap_closed']:.0f}%** of the gap to the teacher.")


if __name__ == "__main__":
    if "--reconstructed" in sys.argv:  # the reconstruction part alone, stored beside the section's other figures
        print(reconstructed_markdown(stored_part("distillation", "reconstructed",
                                                 "python -m benchmarks.distillation --reconstructed",
                                                 lambda: reconstructed("--quick" in sys.argv),
                                                 store="--quick" not in sys.argv)))
    else:
        part_cli(__doc__, "distillation", "quantized_student", run, markdown, quantized_student,
                 quantized_student_markdown)
