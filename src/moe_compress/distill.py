"""Knowledge distillation of a compressed model (student) from the original (teacher), on Hugging Face Trainer.

Loss = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, labels), per predicted token, where p^T
is the softmax at temperature T. The KL is computed in chunks of tokens under activation checkpointing, so at most one
chunk of full-vocabulary fp32 values exists at a time, in the forward and in the backward.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from moe_compress.compression.config import CompressionConfig
from moe_compress.compression.in_memory import compress
from moe_compress.compression.reconstruction import router_parameters as block_router_parameters
from moe_compress.data import DataConfig, build_datasets
from moe_compress.experts import SharedCoreExperts
from moe_compress.quantize import QuantFormat, QuantizedLinear
from moe_compress.folder.load import check_compressed, compression_of, load_model, model_family
from moe_compress.training_run import END_MARKER

TRAINABLE = ("wrappers", "wrappers+cores", "all", "outside-experts")
WRAPPER_PARAMS = ("u_out", "v_out", "u_in", "v_in", "u", "v")


@dataclass(frozen=True)
class DistillationConfig:
    alpha: float = 0.5  # weight of the KL term; 1 - alpha weighs the cross-entropy on the data
    temperature: float = 2.0
    train: str = "wrappers+cores"  # wrappers (cores frozen) | wrappers+cores | all | outside-experts (experts frozen)
    train_routers: bool = False
    chunk_tokens: int = 1024  # tokens per KL chunk
    teacher_quantization: Optional[str] = None  # null | 8bit | 4bit: the teacher's experts as integers (load_teacher)

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha} is outside [0, 1]; it weighs KL against cross-entropy")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.train not in TRAINABLE:
            raise ValueError(f"train={self.train!r} is unknown; use one of {list(TRAINABLE)}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={self.chunk_tokens} must be >= 1")
        if self.teacher_quantization not in (None, *TEACHER_BITS):
            raise ValueError(f"teacher_quantization={self.teacher_quantization!r} is unknown; use null, 8bit or 4bit")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _chunk_terms(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float):
    """Summed KL (at temperature) and CE of one chunk of tokens: [n, V], [n, V], [n] -> two scalars."""
    student, teacher = student.float(), teacher.float()
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum()
    ce = F.cross_entropy(student, labels, reduction="sum")
    return kl, ce


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float, chunk_tokens: int = 1024):
    """(loss, kl, ce), each a mean over the predicted tokens (labels shifted by one, -100 ignored).

    Logits: [B, L, V] in the models' dtype; labels [B, L]."""
    V = student_logits.shape[-1]
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    student = student_logits[:, :-1].reshape(-1, V)[keep]  # [N, V]
    teacher = teacher_logits[:, :-1].reshape(-1, V)[keep]
    targets = targets[keep]
    count = max(int(keep.sum()), 1)
    kl = ce = student.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        # recomputed in backward: the chunk's fp32 softmaxes are never all kept at once
        chunk_kl, chunk_ce = checkpoint(_chunk_terms, student[part], teacher[part], targets[part], temperature,
                                        use_reentrant=False)
        kl, ce = kl + chunk_kl, ce + chunk_ce
    kl, ce = kl / count, ce / count
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce


def router_parameters(model: nn.Module) -> set[int]:
    """ids of the routers' parameters: those beside each experts module whose first dimension counts the experts."""
    return {id(p) for name, module in model.named_modules() if isinstance(module, SharedCoreExperts)
            for p in block_router_parameters(model.get_submodule(name.rpartition(".")[0]), module)}


def trains(train: str, tensor: str) -> bool:
    """Whether `train` trains the compressed experts' tensor of that name."""
    if train in ("all", "outside-experts"):
        return train == "all"
    return tensor in WRAPPER_PARAMS or (train == "wrappers+cores" and tensor == "core")


def train_quantization_aware(model: nn.Module, train: str) -> None:
    """Make the integer storage of the compressed experts that `train` trains trainable through float shadows, rounded
    to the stored format at every forward with straight-through gradients; checkpoints keep storing integers."""
    quantized = [p for m in model.modules() if isinstance(m, SharedCoreExperts) for p in m.projections.values()
                 if any(trains(train, name) for name in p.stored)]
    for projection in quantized:
        projection.train_quantization_aware_(name for name in projection.stored if trains(train, name))
    if quantized:
        print("distill: the experts' integer storage trains quantization-aware (float shadows rounded to the stored "
              "format at every forward, straight-through gradients, scales and zero points fixed; checkpoints store "
              "the integers): codes move only once updates pass half a rounding step, so take a learning rate near "
              "1e-3 (README, Distillation)")


def select_trainable(model: nn.Module, train: str, train_routers: bool) -> tuple[int, int]:
    """Freeze all but what `train` names; return (trainable, total) parameter counts."""
    compression_of(model)
    shared = {id(p) for m in model.modules() if isinstance(m, SharedCoreExperts) for p in m.parameters()}
    routers = router_parameters(model) if train_routers else set()
    for name, p in model.named_parameters():
        if id(p) in shared:
            wanted = trains(train, name.rsplit(".", 1)[-1])
        else:
            wanted = train in ("all", "outside-experts") or id(p) in routers
        p.requires_grad_(wanted)
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"train={train} leaves nothing to train: this model's compressed experts hold no wrappers "
                         "(pure quantization, method=quantize, keeps each expert as its own core); use "
                         "train=wrappers+cores (the cores, quantization-aware) or train=all")
    return trainable, sum(p.numel() for p in params)


def _check_same_family(student: tuple[str, int | None], teacher: tuple[str, int | None]) -> None:
    """Teacher and student must speak the same vocabulary with the same architecture: (model_type, vocab_size)."""
    if student[0] != teacher[0]:
        raise ValueError(f"teacher is a {teacher[0]} model and student a {student[0]} one; "
                         "distill a compressed model from the model it was compressed from")
    if student[1] != teacher[1]:
        raise ValueError(f"teacher vocabulary ({teacher[1]}) differs from the student's ({student[1]}); "
                         "use the teacher the student was compressed from")


def check_pair(student: nn.Module, teacher: nn.Module) -> None:
    compression_of(student)
    _check_same_family(*((m.config.model_type, m.config.vocab_size) for m in (student, teacher)))


def check_family(student: str, teacher: str) -> None:
    """check_pair from the two configs alone, before any model is loaded."""
    check_compressed(student)
    _check_same_family(model_family(student), model_family(teacher))


class DistillationTrainer(Trainer):
    """Trainer whose loss distills `teacher` into the model; logs the KL and CE parts beside the loss."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

    def __init__(self, *args: Any, teacher: nn.Module, distillation: DistillationConfig, **kwargs: Any):
        super().__init__(*args, **kwargs)
        check_pair(self.model, teacher)
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        self.distillation = distillation
        self._parts: dict[str, list[float]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(**model_inputs).logits
        d = self.distillation
        loss, kl, ce = distillation_loss(outputs.logits, teacher_logits, labels, d.alpha, d.temperature,
                                         d.chunk_tokens)
        prefix = "" if model.training else "eval_"
        for key, value in ((f"{prefix}kl", kl), (f"{prefix}ce", ce)):
            self._parts.setdefault(key, []).append(value.item())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        is_eval = any(key.startswith("eval_") for key in logs)
        for key in [k for k in self._parts if k.startswith("eval_") == is_eval]:
            values = self._parts.pop(key)
            logs[key] = sum(values) / len(values)
        super().log(logs, start_time)


TEACHER_BITS = {"8bit": 8, "4bit": 4}
TEACHER_GROUP = 128  # columns per scale: compressed-tensors' W4A16 and W8A16 presets


@dataclass(frozen=True)
class TeacherMemory:
    """What a teacher holds in memory, and what it would hold in bf16 (its weights at 2 bytes each)."""

    resident: int  # bytes of its parameters and buffers
    bf16: int

    def __str__(self) -> str:
        return (f"{self.resident / 2**20:,.1f} MiB resident, {self.resident / self.bf16:.2f}x its "
                f"{self.bf16 / 2**20:,.1f} MiB in bf16")


def teacher_memory(teacher: nn.Module) -> TeacherMemory:
    tensors = [*teacher.parameters(), *teacher.buffers()]
    weights = sum(p.numel() for p in teacher.parameters())  # and those kept as integers:
    weights += sum(m.shape[0] * m.shape[1] for m in teacher.modules() if isinstance(m, QuantizedLinear))
    if getattr(teacher.config, "quantization_config", None) is not None:  # the experts
        weights += compression_of(teacher).stats["params_before"]
    return TeacherMemory(sum(t.numel() * t.element_size() for t in tensors), 2 * weights)


def quantize_linears(model: nn.Module, format: QuantFormat) -> None:
    """Every nn.Linear of `model` as a QuantizedLinear in `format`, round to nearest, but those of the MoE blocks
    around the experts (routers, shared experts: a router's choice is worth its bytes) and an output layer tied to the
    embeddings (quantizing it would untie them)."""
    keep = {id(model.get_output_embeddings())} if getattr(model.config, "tie_word_embeddings", False) else set()
    for name, module in model.named_modules():
        if isinstance(module, SharedCoreExperts):
            keep |= {id(m) for m in model.get_submodule(name.rpartition(".")[0]).modules()}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and id(module) not in keep:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QuantizedLinear(module, format))


def training_dtype(dtype: str, args: TrainingArguments) -> str:
    """The dtype the student and the teacher load in to train under `args`: `dtype` itself, except that "auto" (each
    checkpoint's own) is float32 where the training runs on the CPU. Most CPUs have no native bf16 matmul (the
    compressed testbed distilled 6.2x faster a step in fp32 than in bf16 on an AVX2 CPU, 2026-12-03), and fp32
    weights keep the optimizer's small updates that bf16's 8-bit mantissa would round away."""
    return "float32" if dtype == "auto" and args.device.type == "cpu" else dtype


def load_teacher(name_or_path: str, quantization: str | None = None, dtype: str = "auto") -> nn.Module:
    """The teacher; with quantization ("8bit" or "4bit") its experts stored as 8- or 4-bit integers.

    The experts are nearly all of an MoE's bytes (95% of Qwen3-30B-A3B's), and bitsandbytes, through transformers,
    quantizes only nn.Linear layers: it leaves the fused 3-D expert tensors in their float dtype. So the experts go
    through moe-compress's own integer storage (method=quantize: round to nearest, asymmetric, groups of 128 columns,
    dequantized once per forward), and so do the other linear layers (attention), the same route on CPU and CUDA;
    routers, embeddings and a tied output layer stay as loaded."""
    teacher = load_model(name_or_path, dtype=dtype)
    if quantization is None:
        return teacher
    if quantization not in TEACHER_BITS:
        raise ValueError(f"teacher_quantization={quantization!r} is unknown; use null, 8bit or 4bit")
    before = teacher_memory(teacher)
    config = CompressionConfig(method="quantize", bits=TEACHER_BITS[quantization], group_size=TEACHER_GROUP,
                               symmetric=False)
    compress(teacher, config, progress=False)
    quantize_linears(teacher, config.quant_format)
    print(f"teacher: experts and linear layers stored as {config.bits}-bit integers (moe-compress's integer storage, "
          f"round to nearest, groups of {TEACHER_GROUP}; the same route on CPU and CUDA): {teacher_memory(teacher)}; "
          f"as loaded {before.resident / 2**20:,.1f} MiB", flush=True)
    return teacher


def distill(student: nn.Module, teacher: nn.Module, tokenizer: Any, data: DataConfig,
            distillation: DistillationConfig, args: TrainingArguments, resume: bool = True) -> DistillationTrainer:
    """Train `student` from `teacher` on `data`; checkpoints are compressed folders (load_compressed reads them).

    Resumes from the last checkpoint in args.output_dir when there is one; writes END_MARKER there when done."""
    check_pair(student, teacher)
    train_set, eval_set = build_datasets(data, tokenizer)
    train_quantization_aware(student, distillation.train)
    trainable, total = select_trainable(student, distillation.train, distillation.train_routers)
    print(f"distill: training {trainable:,} of {total:,} student parameters ({distillation.train}"
          f"{' + routers' if distillation.train_routers else ''}); teacher: {teacher_memory(teacher)}")
    trainer = DistillationTrainer(model=student, args=args, train_dataset=train_set, eval_dataset=eval_set,
                                  processing_class=tokenizer, teacher=teacher, distillation=distillation)
    last = get_last_checkpoint(args.output_dir) if resume and Path(args.output_dir).is_dir() else None
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(Path(args.output_dir) / "final"))
    (Path(args.output_dir) / END_MARKER).write_text(json.dumps({"global_step": trainer.state.global_step}))
    return trainer
