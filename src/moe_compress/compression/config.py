"""The settings of a compression: CompressionConfig, and CalibrationConfig for the data its fits are calibrated on.

The dataclasses are the one source of every default, for the Python API and for Hydra (structured configs); the YAML
files under conf/ hold presets only.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from moe_compress.calibration.grams import Regularisation
from moe_compress.data import DataConfig
from moe_compress.experts import form_of
from moe_compress.quantize import QuantFormat

METHODS = ("auto", "als", "adam", "delta", "basis", "mixed", "quantize")
# method=mixed: the shared input basis for gate and up, which read the residual stream every expert reads, and a
# per-expert delta for down, whose input is each expert's own (BENCHMARKS §9)
MIXED_FORMS = {"gate": "basis", "up": "basis", "down": "delta"}
# method=auto fits the shared basis, with calibration data, from this kept fraction on, and mixed below it
# (BENCHMARKS §1)
BASIS_FROM = 0.4
CORE_CHOICES = (1, 2, 4)  # what num_cores="auto" chooses among, per experts module
ALLOCATIONS = ("global", "uniform")
PROJECTIONS = ("gate", "up", "down")
PROPAGATION = ("compressed", "original")
# CalibrationConfig's flat data fields before it held a DataConfig: accepted for one release (0.2), folded into `data`
DEPRECATED_DATA_FIELDS = ("source", "subset", "split", "text_column", "seq_len")
LEGACY_SEQ_LEN = 2048  # the calibration sequences' length those fields defaulted to


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration data for fits in the metric of the experts' routed inputs, and how the statistics are kept.

    `data` says where the token sequences come from and how long they are, as for distillation (the testbed, local
    files, a `datasets` id, streamed); its source null (the default) is data-free. `num_sequences` of them are read.
    The Python API may pass token ids to compress() instead. `source`, `subset`, `split`, `text_column` and `seq_len`
    are deprecated aliases of the fields of `data` (CLI: compression.calibration.source=... still works), removed in
    the next release.
    """

    data: DataConfig = field(default_factory=lambda: DataConfig(source=None))
    num_sequences: int = 256
    batch_size: int = 8  # sequences per forward
    shrink: float = 1.0  # pseudo-tokens of the layer-wide Gram per input dimension, added to every expert's
    damp: float = 1.0  # times the mean diagonal, added to it (measured best on both testbeds; 0.01 overfits)
    propagate: str = "original"  # what each layer passes on: the original layer's outputs, or the compressed one's
    source: Optional[str] = None  # deprecated: data.source
    subset: Optional[str] = None  # deprecated: data.subset
    split: Optional[str] = None  # deprecated: data.split
    text_column: Optional[str] = None  # deprecated: data.text_column
    seq_len: Optional[int] = None  # deprecated: data.seq_len

    def __post_init__(self):
        data = DataConfig(**{"source": None, **self.data}) if isinstance(self.data, dict) else self.data
        aliases = {name: getattr(self, name) for name in DEPRECATED_DATA_FIELDS if getattr(self, name) is not None}
        if aliases:
            warnings.warn(f"calibration {', '.join(aliases)} are deprecated; set calibration.data."
                          f"{{{','.join(aliases)}}} (a DataConfig) instead", FutureWarning, stacklevel=3)
            if data.source is None and "source" in aliases:
                aliases.setdefault("seq_len", LEGACY_SEQ_LEN)
            data = dataclasses.replace(data, **aliases)
            for name in aliases:
                object.__setattr__(self, name, None)
        object.__setattr__(self, "data", data)
        if min(self.num_sequences, self.batch_size) < 1:
            raise ValueError("calibration num_sequences and batch_size must be >= 1")
        if self.propagate not in PROPAGATION:
            raise ValueError(f"calibration propagate={self.propagate!r} is unknown; use one of {list(PROPAGATION)}")
        Regularisation(self.shrink, self.damp)  # checks them

    @property
    def calibrated(self) -> bool:
        """Whether there is calibration data to read: data.source set."""
        return self.data.source is not None

    @property
    def regularisation(self) -> Regularisation:
        return Regularisation(self.shrink, self.damp)

    def statistics_identity(self) -> dict[str, Any]:
        """What calibration statistics depend on, of these settings: the data and how much of it, and propagation."""
        return {"data": dataclasses.asdict(self.data), "num_sequences": self.num_sequences,
                "propagate": self.propagate}


OBJECTIVES = ("block", "normed")
# how the reconstruction weighs each token's error: by the original model's loss gradient at the block's output on it
# (calibration/sensitivity.py), or alike
WEIGHTINGS = ("loss", "uniform")
RECONSTRUCTION_STEPS = 100  # what reconstruction.steps=null runs with calibration data and method=auto (BENCHMARKS §1)


@dataclass(frozen=True)
class ReconstructionConfig:
    """Layer-wise reconstruction (compression/reconstruction.py): after the closed-form fit of an MoE block, `steps`
    Adam steps on the compressed block's stored tensors (and with `router`, the router's weights) so that its output
    on the calibration tokens' inputs matches the original block's; quantized tensors train through their rounding
    (straight-through, scales fixed). It needs calibration data. `steps` null: RECONSTRUCTION_STEPS with calibration
    data and method=auto (or target_bits), else none; 0: off. Each step reads `batch_tokens` of the first `max_tokens`
    calibration tokens that reach the block. `objective` "block" matches the block's output; "normed" the next
    decoder layer's normalised input (the residual added, the next layer's input norm applied: errors weighed as the
    next layer sees them), in memory only (BENCHMARKS §1 compares them). `weighting` "loss" weighs each token's squared
    error by the norm of the original model's loss gradient at the block's output on it (one backward pass of the
    model over those tokens: calibration/sensitivity.py), "uniform" weighs them alike. The last eighth of those
    tokens judges it: a block keeps its reconstruction only where their output error (weighted as trained) falls, and
    reports theirs; with `held_out`, they are not trained on."""

    steps: Optional[int] = None
    lr: float = 3e-3
    batch_tokens: int = 1024
    max_tokens: int = 65536  # held in memory as the inputs and targets, fp32: 2 x 65536 x hidden x 4 bytes
    router: bool = False
    objective: str = "block"
    weighting: str = "loss"
    # the tokens that judge the reconstruction (the last eighth) not trained on: a held-out judgement, at the cost of
    # training on 7/8 of the data (worse on both testbeds at kept 0.3 and 0.5, BENCHMARKS §1)
    held_out: bool = False

    def __post_init__(self):
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
            raise ValueError(f"reconstruction steps={self.steps} is not a step count; use steps >= 0 (0: off) or null")
        if self.lr <= 0 or min(self.batch_tokens, self.max_tokens) < 1:
            raise ValueError("reconstruction lr must be > 0 and batch_tokens, max_tokens >= 1")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"reconstruction objective={self.objective!r} is unknown; use one of {list(OBJECTIVES)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"reconstruction weighting={self.weighting!r} is unknown; use one of {list(WEIGHTINGS)}")

    @property
    def on(self) -> bool:
        """Whether blocks are reconstructed: steps resolved (CompressionConfig.for_data) and positive."""
        return bool(self.steps)


@dataclass(frozen=True)
class CompressionConfig:
    """How to compress. Give `rank` (per projection overrides in `ranks`) or `target_ratio`, the kept fraction of
    expert parameters. With target_ratio, rank_allocation="global" (its default) spends that budget over the whole
    model where it lowers the error most (allocation.py); "uniform" takes the largest rank that fits in every
    projection alike. `method="basis"` fits the shared-basis form (rank r: the width k that stores as much);
    "mixed" the shared input basis for gate and up and delta for down; "auto" (the default) is, with calibration
    data, mixed below target_ratio 0.4 and basis from it, each reconstructed; else delta: the best measured
    (BENCHMARKS §1)."""

    rank: Optional[int] = None
    target_ratio: Optional[float] = None
    target_bits: Optional[float] = None  # bits stored per original expert weight; picks kept fraction, form, bits
    ranks: Optional[dict[str, int]] = None
    method: str = "auto"
    # the closed-form fits alternate until a round improves their objective by at most als_tol of it, at most als_iters
    # rounds: on the fine testbed at kept 0.3, 14 rounds on average and 0.89x the loss increase of 3 fixed rounds
    als_iters: int = 30
    als_tol: float = 1e-3
    polish_steps: int = 0  # Adam steps after als, data-free: at Qwen3-30B-A3B's shape 100 cost 4x the fit for 0.3%
    adam_steps: int = 1000
    lr: float = 1e-3
    seed: int = 0
    device: Optional[str] = None
    rank_allocation: Optional[str] = None  # "global" (default with target_ratio) or "uniform"
    num_cores: Any = 1  # cores per projection, each shared by a k-means group of experts; or "auto" (1, 2 or 4)
    bits: Optional[int] = None  # integer storage of every stored tensor (2, 3, 4 or 8 bits); None: floats
    group_size: Optional[int] = 128  # columns sharing a scale (narrower factors: one scale per row); None: per row
    symmetric: bool = True  # no zero points (vLLM's uint4b8); False adds one per group
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)

    def __post_init__(self):
        if isinstance(self.calibration, dict):  # from Hydra or JSON
            object.__setattr__(self, "calibration", CalibrationConfig(**self.calibration))
        if isinstance(self.reconstruction, dict):
            object.__setattr__(self, "reconstruction", ReconstructionConfig(**self.reconstruction))
        ranks = dict(self.ranks or {})
        if self.target_bits is not None:  # compression/bits.py picks the rest
            if not self.target_bits > 0:
                raise ValueError(f"target_bits={self.target_bits} is not a budget; give the bits per expert weight to "
                                 "keep, e.g. target_bits=2.5 (bf16 experts store 16)")
            given = [n for n in ("rank", "target_ratio", "bits") if getattr(self, n) is not None] + (
                ["ranks"] if ranks else []) + ([f"method={self.method}"] if self.method != "auto" else [])
            if given:
                raise ValueError(f"target_bits picks the kept fraction, the form and the bits itself; drop "
                                 f"{', '.join(given)}, or give those without target_bits")
            if self.num_cores != 1:
                raise ValueError("target_bits chooses among forms of one core per projection; use num_cores=1")
            return  # the chosen config is checked in its turn
        if self.method == "quantize":  # the experts as they are, only quantized: no rank, no budget in parameters
            # ranks of 0 are what this sets: a config made from another (dataclasses.replace) has them
            if self.bits is None or self.rank is not None or self.target_ratio is not None or any(ranks.values()):
                raise ValueError("method=quantize stores every expert as it is, quantized: give bits=<2, 3, 4 or 8> "
                                 "and no rank or target_ratio")
            ranks = dict.fromkeys(PROJECTIONS, 0)
        if self.rank is None and self.target_ratio is None and set(ranks) != set(PROJECTIONS):
            raise ValueError("CompressionConfig needs a size: set rank=<int> or target_ratio=<kept fraction in (0, 1)>")
        if self.rank is not None and self.target_ratio is not None:
            raise ValueError("CompressionConfig got both rank and target_ratio; set only one of them")
        if self.target_ratio is not None and not 0 < self.target_ratio < 1:
            raise ValueError(f"target_ratio={self.target_ratio} is not a kept fraction; use a value in (0, 1)")
        unknown = set(ranks) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"ranks has unknown projections {sorted(unknown)}; use keys among {list(PROJECTIONS)}")
        for name, r in [("rank", self.rank), *ranks.items()]:
            if r is not None and (not isinstance(r, int) or r < 1) and self.method != "quantize":
                raise ValueError(f"{name}={r} is not a positive integer rank; use rank >= 1")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; use one of {list(METHODS)}")
        if min(self.als_iters, self.polish_steps, self.adam_steps, self.als_tol) < 0 or self.lr <= 0:
            raise ValueError("als_iters, als_tol, polish_steps and adam_steps must be >= 0 and lr > 0")
        object.__setattr__(self, "ranks", ranks or None)
        allocation = self.rank_allocation or ("global" if self.target_ratio is not None else "uniform")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"rank_allocation={allocation!r} is unknown; use one of {list(ALLOCATIONS)}")
        if allocation == "global" and self.target_ratio is None:
            raise ValueError("rank_allocation=global spends a budget: give target_ratio=<kept fraction> instead of "
                             "rank, or set rank_allocation=uniform")
        object.__setattr__(self, "rank_allocation", allocation)
        if self.num_cores == "auto":
            if self.target_ratio is None:
                raise ValueError("num_cores=auto chooses within a budget: give target_ratio=<kept fraction>")
        elif not isinstance(self.num_cores, int) or self.num_cores < 1:
            raise ValueError(f"num_cores={self.num_cores} is not a positive integer or auto; use num_cores >= 1")
        elif self.num_cores > 1 and self.method in ("basis", "mixed", "quantize"):
            raise ValueError(f"method={self.method} shares one basis and one core per projection; use num_cores=1 "
                             "with it")
        if self.bits is not None:
            self.quant_format  # checks bits and group_size
            if self.method in ("als", "adam"):
                raise ValueError(f"method={self.method} (the wrapped form) has no quantized storage; use method=delta, "
                                 "basis, mixed, auto or quantize with bits")

    @property
    def quant_format(self) -> Optional[QuantFormat]:
        """The integer format of every stored tensor, or None for float storage."""
        return None if self.bits is None else QuantFormat(self.bits, self.group_size, self.symmetric)

    @property
    def cores(self) -> int:
        """Cores per projection before num_cores=auto has chosen (it starts from one)."""
        return 1 if self.num_cores == "auto" else self.num_cores

    @property
    def form(self) -> str | dict[str, str]:
        """The form of every projection, or {projection: form} for method=mixed: a spec's "form"."""
        if self.method == "auto":
            raise ValueError("method=auto has no form until it knows whether there is calibration data; "
                             "use config.for_data(calibrated)")
        if self.method == "mixed":
            return dict(MIXED_FORMS)
        if self.method == "quantize":
            return "dense"
        return self.method if self.method in ("delta", "basis") else "wrapped"

    def form_of(self, projection: str) -> str:
        return form_of(self.form, projection)

    def for_data(self, calibrated: bool) -> CompressionConfig:
        """This config with method=auto and reconstruction.steps=null made concrete. With calibration statistics:
        mixed below BASIS_FROM of the expert parameters kept, basis from it, each reconstructed; delta without them,
        or with several cores (a basis has one core)."""
        if self.reconstruction.steps is None:
            auto = calibrated and (self.method == "auto" or self.target_bits is not None)
            steps = RECONSTRUCTION_STEPS if auto else 0
            return dataclasses.replace(self, reconstruction=dataclasses.replace(self.reconstruction, steps=steps)
                                       ).for_data(calibrated)
        if self.reconstruction.on and not calibrated:
            raise ValueError("reconstruction matches each block's output on calibration tokens: give calibration data "
                             "(calibration.data or token ids), or set reconstruction.steps=0")
        if self.method != "auto" or self.target_bits is not None:  # target_bits: made concrete by its choice
            return self
        if not calibrated or self.num_cores not in (1, "auto"):
            return dataclasses.replace(self, method="delta")
        large = self.target_ratio is not None and self.target_ratio >= BASIS_FROM
        return dataclasses.replace(self, method="basis" if large else "mixed")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

