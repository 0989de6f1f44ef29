"""Question 5: does a short CPU distillation win back the quality zero-shot compression lost?

The testbed compressed to about 0.3 of its expert parameters (default fit) is distilled from the original for a few
minutes on CPU; held-out loss on the full validation split before, after, and of the teacher, and the loss curve.
"""

from __future__ import annotations

import tempfile
import time

from transformers import TrainingArguments

from benchmarks.common import plot_to, table
from moe_compress import CompressionConfig, compress
from moe_compress.data import DataConfig
from moe_compress.distill import DistillationConfig, distill
from moe_compress.testbed import heldout_loss, load_testbed, read_split

FULL = dict(ratio=0.3, steps=300, batch=16, seq_len=256, lr=1e-4, alpha=0.9, eval_steps=50, max_tokens=None)
QUICK = dict(ratio=0.3, steps=4, batch=2, seq_len=64, lr=1e-4, alpha=0.9, eval_steps=4, max_tokens=4096)


def run(quick: bool = False) -> dict:
    s = QUICK if quick else FULL
    teacher, tokenizer = load_testbed()
    student, _ = load_testbed()
    report = compress(student, CompressionConfig(target_ratio=s["ratio"]), progress=False)
    text = read_split("validation")
    loss = lambda model: heldout_loss(model, text, max_tokens=s["max_tokens"])
    teacher_loss, before = loss(teacher), loss(student)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="distill-bench-"), max_steps=s["steps"], per_device_train_batch_size=s["batch"],
        per_device_eval_batch_size=s["batch"], learning_rate=s["lr"], lr_scheduler_type="cosine", warmup_steps=s["steps"] // 20,
        logging_steps=max(1, s["steps"] // 30), eval_strategy="steps", eval_steps=s["eval_steps"], save_strategy="no",
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    )
    start = time.perf_counter()
    trainer = distill(student, teacher, tokenizer, DataConfig(seq_len=s["seq_len"]), DistillationConfig(alpha=s["alpha"]),
                      args)
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


def markdown(result: dict) -> str:
    s = result["setting"]
    rows = [["teacher (original)", f"{result['teacher']:.4f}"],
            ["compressed, zero-shot", f"{result['before']:.4f}"],
            [f"compressed, distilled {s['steps']} steps", f"{result['after']:.4f}"]]
    return (f"Kept fraction {result['kept_fraction']:.3f}; {s['steps']} steps of {s['batch']} x {s['seq_len']} bytes, "
            f"lr {s['lr']}, alpha {s['alpha']}, T 2, wrappers and cores trained: {result['seconds']:.0f} s on CPU.\n\n"
            + table(["model", "held-out loss (nats per byte)"], rows)
            + f"\n\nThe distillation closes **{100 * result['gap_closed']:.0f}%** of the gap to the teacher.")


if __name__ == "__main__":
    result = run()
    print(markdown(result))
    plot(result, "benchmarks/distillation.png")
