"""A pipeline run's folder: where each stage writes, and what each stage produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moe_compress.compression.report import CompressionReport


@dataclass
class PipelineRun:
    """Where the run lives and what each stage produced."""

    folder: Path
    seconds: dict[str, float] = field(default_factory=dict)
    report: CompressionReport | None = None

    @property
    def compressed(self) -> Path:
        return self.folder / "compressed"

    @property
    def distill_dir(self) -> Path:
        return self.folder / "distill"

    @property
    def eval_dir(self) -> Path:
        return self.folder / "eval"
