"""moe-compress: shared-core compression of Mixture-of-Experts language models.

    import moe_compress as mc
    report = mc.compress(model, mc.CompressionConfig(rank=64))
    mc.save_compressed(model, "out/model-sc64")
    model = mc.load_compressed("out/model-sc64")
    mc.compress_checkpoint("path/to/model", "out/model-sc64", mc.CompressionConfig(rank=64))  # bounded memory
"""

from moe_compress.checkpoint import SharedCoreConfig, load_compressed, save_compressed
from moe_compress.compress import CompressionConfig, CompressionReport, RankTooLargeError, compress
from moe_compress.data import DataConfig
from moe_compress.distill import DistillationConfig, DistillationTrainer, distill
from moe_compress.discovery import NoExpertsError, find_experts
from moe_compress.evaluate import EvalConfig, evaluate_model, read_results, watch
from moe_compress.experts import SharedCoreExperts
from moe_compress.streaming import compress_checkpoint

__all__ = [
    "CompressionConfig",
    "CompressionReport",
    "DataConfig",
    "DistillationConfig",
    "DistillationTrainer",
    "EvalConfig",
    "NoExpertsError",
    "RankTooLargeError",
    "SharedCoreConfig",
    "SharedCoreExperts",
    "compress",
    "compress_checkpoint",
    "distill",
    "evaluate_model",
    "find_experts",
    "load_compressed",
    "read_results",
    "save_compressed",
    "watch",
]
__version__ = "0.1.0"
