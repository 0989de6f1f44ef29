"""moe-compress: shared-core compression of Mixture-of-Experts language models.

    import moe_compress as mc
    report = mc.compress(model, mc.CompressionConfig(rank=64))
    mc.save_compressed(model, "out/model-sc64")
    model = mc.load_compressed("out/model-sc64")
    mc.compress_checkpoint("path/to/model", "out/model-sc64", mc.CompressionConfig(rank=64))  # bounded memory
    mc.export_dense("out/model-sc64", "out/model-dense")   # a plain transformers folder, for other tools

The names below are imported on first use: the start-up hook (moe_compress.autoload) runs in every Python process
of the environment and imports this package, which must therefore cost next to nothing until it is used.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from moe_compress.autoload import install

install()  # transformers then loads compressed folders, also where the start-up hook is not installed

TYPE_CHECKING = False  # not typing's: importing typing costs every Python start several ms
_EXPORTS = {
    "SharedCoreConfig": "moe_compress.folder.quantizer",
    "load_compressed": "moe_compress.folder.load",
    "load_model": "moe_compress.folder.load",
    "save_compressed": "moe_compress.folder.save",
    "NoSpaceError": "moe_compress.folder.save",
    "CalibrationConfig": "moe_compress.compression.config",
    "CompressionConfig": "moe_compress.compression.config",
    "CompressionReport": "moe_compress.compression.report",
    "ReconstructionConfig": "moe_compress.compression.config",
    "RankTooLargeError": "moe_compress.compression.budget",
    "compress": "moe_compress.compression.in_memory",
    "compress_checkpoint": "moe_compress.compression.from_folder",
    "DataConfig": "moe_compress.data",
    "DistillationConfig": "moe_compress.distill",
    "DistillationTrainer": "moe_compress.distill",
    "distill": "moe_compress.distill",
    "NoExpertsError": "moe_compress.discovery",
    "find_experts": "moe_compress.discovery",
    "EvalConfig": "moe_compress.evaluate",
    "evaluate_model": "moe_compress.evaluate",
    "read_results": "moe_compress.evaluate",
    "watch": "moe_compress.evaluate",
    "ModuleSpec": "moe_compress.experts",
    "SharedCoreExperts": "moe_compress.experts",
    "pack_for_cpu": "moe_compress.experts",
    "export_dense": "moe_compress.folder.export",
    "merge_experts": "moe_compress.baselines",
    "prune_experts": "moe_compress.baselines",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe_compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


class _Package(ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # importing the submodule moe_compress.compress (or .distill) binds it here, over the function of that name
        if name in _EXPORTS and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:
    from typing import Any

    from moe_compress.baselines import merge_experts, prune_experts
    from moe_compress.compression.budget import RankTooLargeError
    from moe_compress.compression.config import CalibrationConfig, CompressionConfig, ReconstructionConfig
    from moe_compress.compression.from_folder import compress_checkpoint
    from moe_compress.compression.in_memory import compress
    from moe_compress.compression.report import CompressionReport
    from moe_compress.data import DataConfig
    from moe_compress.discovery import NoExpertsError, find_experts
    from moe_compress.distill import DistillationConfig, DistillationTrainer, distill
    from moe_compress.evaluate import EvalConfig, evaluate_model, read_results, watch
    from moe_compress.experts import ModuleSpec, SharedCoreExperts, pack_for_cpu
    from moe_compress.folder.export import export_dense
    from moe_compress.folder.load import load_compressed, load_model
    from moe_compress.folder.quantizer import SharedCoreConfig
    from moe_compress.folder.save import NoSpaceError, save_compressed
