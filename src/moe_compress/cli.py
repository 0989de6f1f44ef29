"""The `moe-compress` command: `moe-compress <stage> [hydra overrides]`. It parses, loads a config, calls the
library; all logic lives in the library."""

from __future__ import annotations

import dataclasses
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

import torch
from transformers import TrainingArguments

from moe_compress.compression.config import CompressionConfig
from moe_compress.compression.from_folder import compress_checkpoint
from moe_compress.data import DataConfig
from moe_compress.distill import DistillationConfig, check_family, distill, load_teacher, training_dtype
from moe_compress.evaluate import EvalConfig, evaluate_model, format_scores, watch
from moe_compress.folder.export import export_dense, size_note
from moe_compress.folder.load import load_compressed, load_tokenizer, local_model_folder
from moe_compress.folder.save import NoSpaceError
from moe_compress.pipeline.run import run_pipeline


def _schema(dataclass_type: type, open_keys: bool = False) -> DictConfig:
    """A typed Hydra node from a frozen config dataclass, the one source of its defaults: writable (nested
    dataclasses too) so that defaults and overrides can merge; with `open_keys`, other keys may sit beside its fields
    (the eval stage's own settings beside EvalConfig's)."""
    node = OmegaConf.structured(dataclass_type)
    todo = [node]
    while todo:  # frozen dataclasses make read-only nodes, at every depth
        child = todo.pop()
        OmegaConf.set_readonly(child, False)
        todo += [child._get_node(key) for key in child if isinstance(child._get_node(key), DictConfig)]
    OmegaConf.set_struct(node, not open_keys)
    return node


for group, schema in (("compression", CompressionConfig), ("distill", DistillationConfig), ("data", DataConfig),
                      ("eval", EvalConfig)):
    ConfigStore.instance().store(group=group, name="schema", node=_schema(schema, open_keys=schema is EvalConfig))


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input ends the command with one line that names the cause and the fix, not a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, NoSpaceError) as error:
        sys.exit(f"moe-compress: error: {error}")


def settings(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def training_settings(cfg: DictConfig) -> dict:
    """TrainingArguments' keywords from the training node; `activation_checkpointing` (transformers' name since it
    deprecated `gradient_checkpointing`) goes by the old name to a transformers that predates it."""
    training = settings(cfg.training)
    known = {field.name for field in dataclasses.fields(TrainingArguments)}
    if "activation_checkpointing" in training and "activation_checkpointing" not in known:
        training["gradient_checkpointing"] = training.pop("activation_checkpointing")
    if "wandb" in str(training.get("report_to")):
        os.environ.setdefault("WANDB_MODE", "offline")  # no account needed; `wandb sync` uploads later
    if training.get("bf16") == "auto":
        training["bf16"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {"use_cpu": not torch.cuda.is_available(), **training}


def run_compress(cfg: DictConfig) -> None:
    with user_errors():
        config = CompressionConfig(**settings(cfg.compression))
        report = compress_checkpoint(local_model_folder(cfg.model), cfg.output_dir, config, overwrite=cfg.overwrite,
                                     trust_remote_code=cfg.trust_remote_code)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            print(report)
            print(f"compressed model written to {cfg.output_dir}")


def run_distill(cfg: DictConfig) -> None:
    with user_errors():
        distillation, data = DistillationConfig(**settings(cfg.distill)), DataConfig(**settings(cfg.data))
        args = TrainingArguments(output_dir=cfg.output_dir, **training_settings(cfg))
        check_family(cfg.student, cfg.teacher)
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.student, f"pass tokenizer=<a folder or hub id>, e.g. "
                                   f"tokenizer={cfg.teacher} (the teacher's: its vocabulary matches the student's)")
        dtype = training_dtype(cfg.dtype, args)
        student = load_compressed(cfg.student, dtype=dtype)
        teacher = load_teacher(cfg.teacher, distillation.teacher_quantization, dtype)
        trainer = distill(student, teacher, tokenizer, data, distillation, args, resume=cfg.resume)
        print(f"distilled {trainer.state.global_step} steps; checkpoints and final/ in {cfg.output_dir}")


def eval_config(node: DictConfig) -> EvalConfig:
    values = settings(node)
    return EvalConfig(**{field.name: values[field.name] for field in dataclasses.fields(EvalConfig)})


def run_pipeline_stage(cfg: DictConfig) -> None:
    with user_errors():
        run = run_pipeline(
            HydraConfig.get().runtime.output_dir, cfg.model, cfg.teacher,
            CompressionConfig(**settings(cfg.compression)), DistillationConfig(**settings(cfg.distill)),
            DataConfig(**settings(cfg.data)), eval_config(cfg.eval), training_settings(cfg), cfg.dtype,
            cfg.devices.eval,
        )
        print(f"report written to {run.folder / 'report.md'}")


def run_eval(cfg: DictConfig) -> None:
    with user_errors():
        if (cfg.model is None) == (cfg.watch is None):
            raise ValueError("give model=<folder> to score one model, or watch=<training output_dir> to score each "
                             "of its checkpoints as training writes it")
        config = eval_config(cfg)
        if cfg.model is not None:
            print(format_scores(evaluate_model(cfg.model, config, tokenizer=cfg.tokenizer)))
            return
        watch(cfg.watch, config, teacher=cfg.teacher, results_dir=cfg.results_dir, poll_seconds=cfg.poll_seconds,
              max_retries=cfg.max_retries, wait_for_dir=cfg.wait_for_dir, report_to=cfg.report_to,
              tokenizer=cfg.tokenizer, initial=cfg.initial)


def run_export(cfg: DictConfig) -> None:
    with user_errors():
        if cfg.model is None:
            raise ValueError("give model=<compressed folder> to export, and output_dir=<folder> for the dense copy")
        export_dense(cfg.model, cfg.output_dir, dtype=cfg.dtype, overwrite=cfg.overwrite)
        print(size_note(cfg.model, cfg.output_dir))


STAGES: dict[str, tuple[Callable[[DictConfig], None], str]] = {
    "compress": (run_compress, "fit shared cores and wrappers to a model's experts; save the compressed model"),
    "distill": (run_distill, "train a compressed model from the original with alpha*KL + (1-alpha)*CE"),
    "eval": (run_eval, "score a model with lm-eval, or each checkpoint of a training run as it is written"),
    "export": (run_export, "write a compressed folder back with dense experts, for tools that cannot load it"),
    "pipeline": (run_pipeline_stage, "compress, evaluate, distill with a checkpoint watcher beside it, report"),
}


def usage() -> str:
    lines = ["usage: moe-compress <stage> [key=value ...] [hydra options: --cfg job, -m, --help]", "", "stages:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in STAGES.items()]
    lines += ["", "example: moe-compress compress model=Qwen/Qwen3-30B-A3B compression.rank=64 output_dir=out/sc64"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    stage, overrides = argv[0], argv[1:]
    if stage not in STAGES:
        sys.exit(f"moe-compress: error: unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    sys.argv = [f"moe-compress {stage}", *overrides]
    # the pipeline's model presets live apart, so that `model=<path or hub id>` stays a plain value elsewhere
    conf = Path(__file__).parent / "conf" / ("pipeline" if stage == "pipeline" else "")
    run = hydra.main(config_path=str(conf), config_name=stage, version_base=None)
    run(STAGES[stage][0])()
