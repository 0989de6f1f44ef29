"""compress(model, config): replace every experts module of a loaded transformers MoE model by SharedCoreExperts, in
place.

Data-free, every fit minimises the weight error sum_e ||W_e - What_e||^2. Given calibration token ids (or
config.calibration.data, read with the model's tokenizer), the tokens run through the model one decoder layer at a
time; each layer's experts are fitted in the metric of their routed inputs as the layer is reached, and swapped in
before the next layer, which sees the compressed layer's outputs with propagate=compressed.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from moe_compress.calibration.grams import ExpertGrams
from moe_compress.calibration.layers import decoder_layers, loaded_statistics
from moe_compress.calibration.observe import Calibration, token_batches
from moe_compress.calibration.sensitivity import token_sensitivity
from moe_compress.compression import bits, engine
from moe_compress.compression.config import CompressionConfig
from moe_compress.compression.fitting import FittedModule, Weights
from moe_compress.compression.reconstruction import Normed, reconstruct
from moe_compress.compression.report import BlockError, CompressionReport
from moe_compress.discovery import find_experts, split_weights
from moe_compress.experts import ModuleSpec, SharedCoreExperts
from moe_compress.folder.save import attach_quantization_config
from moe_compress.parallel import fit_device


class LoadedModel:
    """A model in memory as the engine's experts source: its experts modules, read in place, and their statistics
    gathered by a layer-by-layer pass of the calibration batches."""

    def __init__(self, model: nn.Module, batches: Optional[list], batch_size: int):
        if any(isinstance(m, SharedCoreExperts) for m in model.modules()):
            raise ValueError("this model is already compressed; compress the original model instead")
        self.model, self.batches = model, batches
        self.found = find_experts(model)
        for name, experts in self.found:  # before any work: the checkpoint folder finds these as it reads
            for pname, p in experts.named_parameters(recurse=False):
                if not p.isfinite().all():
                    raise ValueError(f"{name}.{pname} holds NaN or Inf values; fix or re-download the checkpoint "
                                     "before compressing")
        self.calibrated = batches is not None
        self.batch_size = batch_size
        self.keep_inputs = 0  # tokens' inputs each module's statistics keep, for the reconstruction (keep())
        self.keep_outputs = False  # and their layer's outputs (objective=normed)
        self.sensitivity: dict[str, torch.Tensor] = {}  # and with weighting=loss, their weights [N] per module

    def experts(self) -> list[tuple[str, nn.Module]]:
        return self.found

    def read(self, name: str, projections: Sequence[str]) -> Weights:
        parts = split_weights(self.model.get_submodule(name))
        return {p: parts[p] for p in projections}

    def statistics(self, names: Collection[str], recompute: bool) -> Iterator[dict[str, ExpertGrams]]:
        return loaded_statistics(self.model, self.batches, names, recompute, self.keep_inputs, self.keep_outputs)

    def keep(self, config: CompressionConfig, progress: bool = False) -> None:
        """What the statistics keep for config's reconstruction: its tokens' inputs, for objective=normed their
        layer's outputs, and for weighting=loss their weights, from a backward pass of the original model (with
        `progress`, a bar over its batches)."""
        self.keep_inputs = engine.kept_inputs(config)
        self.keep_outputs = config.reconstruction.objective == "normed"
        if engine.weighs(config):
            blocks = {name: self.model.get_submodule(name.rpartition(".")[0]) for name, _ in self.found}
            self.sensitivity = token_sensitivity(self.model, self.batches, blocks, self.keep_inputs, progress)

    def next_norm(self, name: str) -> nn.Module:
        """The norm the decoder layer after the one holding `name` applies to its input (`input_layernorm`), or the
        model's final norm after the last layer."""
        prefix, layers = decoder_layers(self.model)
        index = int(name.removeprefix(f"{prefix}.").split(".")[0])
        norm = (getattr(layers[index + 1], "input_layernorm", None) if index + 1 < len(layers)
                else getattr(self.model.base_model, "norm", None))
        if norm is None:
            raise ValueError(f"reconstruction objective=normed finds no input norm after {name} (input_layernorm of "
                             "the next decoder layer, or the model's final norm); use objective=block")
        return norm

    def swap_in(self, fitted: FittedModule, config: CompressionConfig) -> Optional[BlockError]:
        """Replace the experts module by its fitted SharedCoreExperts, on the module's device; with
        config.reconstruction on, trained within its block to the original block's outputs (the block's error)."""
        experts = self.model.get_submodule(fitted.name)
        device = next(experts.parameters()).device
        projections = {p: proj.to(device) for p, proj in fitted.projections.items()}
        shared = SharedCoreExperts(SharedCoreExperts.from_template(experts), projections).train(experts.training)
        parent, _, child = fitted.name.rpartition(".")
        block = self.model.get_submodule(parent)
        if config.reconstruction.on:
            normed = None
            if config.reconstruction.objective == "normed":
                normed = Normed(self.next_norm(fitted.name), fitted.layer_outputs)
            return reconstruct(fitted.name, block, experts, shared, fitted.inputs, config.reconstruction, config.seed,
                               normed, fitted.targets, self.sensitivity.get(fitted.name))
        setattr(block, child, shared)
        return None


def calibration_batches(model: nn.Module, config: CompressionConfig,
                        calibration: Optional[Calibration]) -> Optional[list]:
    """The calibration batches: those given (a LongTensor [N, L] split into config.calibration.batch_size sequences,
    or an iterable of batches as it is), else config.calibration.data read with the model's tokenizer, else None."""
    if calibration is None:
        calibration = engine.calibration_text(config, getattr(model, "name_or_path", "") or "")
    if calibration is None:
        return None
    return list(token_batches(calibration, config.calibration.batch_size))  # read twice with global ranks


def compress(model: nn.Module, config: CompressionConfig, calibration: Optional[Calibration] = None,
             progress: bool = True) -> CompressionReport:
    """Replace every experts module of `model` by a fitted SharedCoreExperts, in place; return the report.

    `calibration`, token ids [N, L] (or an iterable of such batches), makes every fit minimise the error on the
    inputs each expert is routed in them (config.calibration says how the statistics are regularised); without it,
    config.calibration.data names calibration text to read with the model's tokenizer."""
    source = LoadedModel(model, calibration_batches(model, config, calibration), config.calibration.batch_size)
    record = config.for_data(source.calibrated)  # what the folder records: target_bits as asked, not as chosen
    config, choice = record, None
    if record.target_bits is not None:
        config, choice = bits.choose(source, record, fit_device(config.device), progress)
    specs = engine.plan(source, config)
    if engine.curves_decide(config):
        with tqdm(total=len(specs), desc="rank curves", unit="module", disable=not progress) as bar:
            found = {name: (curves, spec) for name, curves, spec in
                     engine.curves(source, specs, specs, config, fit_device(config.device), bar)}
        specs = engine.allocated_specs(config, found, engine.params_before(source))
    source.keep(record, progress)  # after the passes that read the Grams alone: they need none of the kept tokens
    return fit_in_place(source, specs, config, progress, record, choice)


def plan(model: nn.Module, config: CompressionConfig) -> dict[str, ModuleSpec]:
    """The spec compress() starts from for each experts module of `model`: uniform ranks, before any allocation."""
    return engine.plan(LoadedModel(model, None, config.calibration.batch_size), config)


def compress_as(model: nn.Module, specs: dict[str, ModuleSpec], config: CompressionConfig,
                calibration: Optional[Calibration] = None, progress: bool = True) -> CompressionReport:
    """compress() with the spec of every experts module given (form, cores, ranks) instead of planned from the
    config's size: to try allocations of one's own."""
    source = LoadedModel(model, calibration_batches(model, config, calibration), config.calibration.batch_size)
    config = config.for_data(source.calibrated)
    source.keep(config, progress)
    return fit_in_place(source, specs, config, progress)


def fit_in_place(source: LoadedModel, specs: dict[str, ModuleSpec], config: CompressionConfig, progress: bool,
                 record: Optional[CompressionConfig] = None, choice: Optional[dict] = None) -> CompressionReport:
    """Fit every experts module of `specs` and swap it in, layer by layer; record the compression in the model's
    config (`record`: the settings as asked, config when None; `choice`: what target_bits chose)."""
    rows, coverage, blocks = [], {}, []
    with tqdm(total=sum(len(s.ranks) for s in specs.values()), desc="compress", disable=not progress) as bar:
        units = {name: list(spec.ranks) for name, spec in specs.items()}
        for fitted in engine.fitted_modules(source, specs, units, config, fit_device(config.device), bar):
            block = source.swap_in(fitted, config)
            if block is not None:
                bar.set_postfix_str(f"{fitted.name.removesuffix('.experts')[-24:]} block err "
                                    f"{block.before:.3f} -> {block.after:.3f} {block.seconds:.1f}s")
                blocks.append(block)
            rows += fitted.rows
            if fitted.coverage is not None:
                coverage[fitted.name] = fitted.coverage
    report = engine.report_of(config, rows, coverage, source)
    report.choice, report.blocks = choice, blocks
    attach_quantization_config(source.model, specs, record or config, report)
    return report
