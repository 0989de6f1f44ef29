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
    "SharedCoreConfig": "moe_compress.quantizer",
    "load_compressed": "moe_compress.checkpoint",
    "save_compressed": "moe_compress.checkpoint",
    "CompressionConfig": "moe_compress.compress",
    "CompressionReport": "moe_compress.compress",
    "RankTooLargeError": "moe_compress.compress",
    "compress": "moe_compress.compress",
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
    "SharedCoreExperts": "moe_compress.experts",
    "export_dense": "moe_compress.export",
    "merge_experts": "moe_compress.peers",
    "prune_experts": "moe_compress.peers",
    "compress_checkpoint": "moe_compress.streaming",
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
    from moe_compress.checkpoint import load_compressed, save_compressed
    from moe_compress.compress import CompressionConfig, CompressionReport, RankTooLargeError, compress
    from moe_compress.data import DataConfig
    from moe_compress.discovery import NoExpertsError, find_experts
    from moe_compress.distill import DistillationConfig, DistillationTrainer, distill
    from moe_compress.evaluate import EvalConfig, evaluate_model, read_results, watch
    from moe_compress.experts import SharedCoreExperts
    from moe_compress.export import export_dense
    from moe_compress.peers import merge_experts, prune_experts
    from moe_compress.quantizer import SharedCoreConfig
    from moe_compress.streaming import compress_checkpoint
