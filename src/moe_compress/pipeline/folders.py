"""A pipeline run's folder: where each stage writes, and what each stage produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moe_compress.compression.report import CompressionReport
from moe_compress.distill import TeacherMemory


@dataclass
class PipelineRun:
    """Where the run lives and what each stage produced."""

    folder: Path
    seconds: dict[str, float] = field(default_factory=dict)
    report: CompressionReport | None = None
    teacher: TeacherMemory | None = None  # what the teacher held in memory while it was distilled from

    @property
    def compressed(self) -> Path:
        return self.folder / "compressed"

    @property
    def distill_dir(self) -> Path:
        return self.folder / "distill"

    @property
    def eval_dir(self) -> Path:
        return self.folder / "eval"
