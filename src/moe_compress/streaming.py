"""compress_checkpoint(source, output_dir, config): compress a safetensors checkpoint folder without loading the model.

The model is built on the meta device only to find its experts modules. Their tensors are read one experts module
at a time straight from the shards, through transformers' own checkpoint conversion (so that both on-disk layouts
work: per-expert 2-D tensors such as `experts.7.gate_proj.weight` or `experts.7.w1.weight`, and fused 3-D tensors),
fitted, written, and freed. Everything else is copied through byte for byte under its on-disk name. Peak memory is
one experts module and the fit's working set, whatever the model's size.

Under torchrun the (layer, projection) units are split across processes; see moe_compress.parallel for the split,
the manifest and resuming. Shapes: E experts, out x in a projection's matrices, r rank.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import torch
from matplotlib.figure import Figure
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
from transformers.utils.hub import convert_file_size_to_int

from moe_compress.folder_config import mark_dict, write_shim
from moe_compress.checkpoint import QUANT_METHOD, _replace, attach_quantization_config, check_output_dir, \
    load_tokenizer, model_card
from moe_compress.calibration import Calibration, token_batches
from moe_compress.allocation import Curve
from moe_compress.compress import CompressionConfig, CompressionReport, ProjectionStats, allocate_ranks, choose_rank, \
    curves_decide, fit_into, module_curves, stored_params, warn_starved
from moe_compress.data import DataConfig, calibration_sequences
from moe_compress.layerwise import gather_statistics, load_statistics, load_token_counts, statistics_dir
from moe_compress.discovery import find_experts, projection_names, split_weights
from moe_compress.experts import make_projection
from moe_compress.parallel import Manifest, Ranks, barrier, distributed, fit_device, from_main, open_work_dir, share, \
    write_atomically

# Bytes per element of safetensors dtypes: a file lists its tensors widest first, so that each starts at a multiple of
# its element size (safetensors' own writer does the same); the rest are 1 byte wide or narrower.
ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
COPY_BUFFER = 64 << 20
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.gguf")


@dataclass
class Source:
    """How one parameter of an experts module is stored: on-disk tensor names, in transformers' loading order, and
    the conversion transformers applies to them (None when the parameter is stored as is, under its own name)."""

    keys: list[str] = dataclasses.field(default_factory=list)
    patterns: list[str] = dataclasses.field(default_factory=list)
    converter: WeightConverter | None = None


@dataclass
class ExpertsOnDisk:
    name: str  # the module's name in the model, e.g. model.layers.0.mlp.experts
    module: nn.Module  # the meta-device module: its flags and shapes
    sources: dict[str, Source]  # parameter name -> where it is on disk
    saved_as: str  # the prefix its compressed tensors are written under, in the checkpoint's own spelling


@dataclass
class Checkpoint:
    """A safetensors checkpoint folder, as far as compressing it needs: its config, its meta-device model, which
    shard holds each tensor, and where each experts module's tensors are."""

    folder: Path
    config: PretrainedConfig
    model: nn.Module
    files: dict[str, str]  # tensor name -> shard file name
    experts: list[ExpertsOnDisk]

    @property
    def other_keys(self) -> list[str]:
        """The tensors that are copied through unchanged."""
        expert_keys = {k for e in self.experts for s in e.sources.values() for k in s.keys}
        return [k for k in self.files if k not in expert_keys]

    def path(self, key: str) -> Path:
        return self.folder / self.files[key]


@contextmanager
def reading() -> Iterator[Callable[[Path, str], torch.Tensor]]:
    """read(file, name) -> tensor, for the block's duration. safetensors files are memory-mapped and the pages read
    stay resident while a file is open: opening files per block keeps memory to what the block reads."""
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(path: Path, key: str) -> torch.Tensor:
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, "pt"))
            return handles[path].get_tensor(key)

        yield read


def can_stream(path: str | Path) -> bool:
    """Whether compress_checkpoint reads `path`: a local model folder with safetensors weights."""
    folder = Path(path)
    weights = (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()
    return (folder / "config.json").exists() and weights


def _weight_files(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    if (folder / "model.safetensors").exists():
        with safe_open(folder / "model.safetensors", "pt") as f:
            return dict.fromkeys(f.keys(), "model.safetensors")
    raise FileNotFoundError(
        f"{folder} holds no safetensors weights (model.safetensors or model.safetensors.index.json); streaming reads "
        "safetensors only: convert the checkpoint, or compress the loaded model with moe_compress.compress"
    )


def _meta_model(folder: Path, trust_remote_code: bool) -> tuple[PretrainedConfig, nn.Module]:
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no model folder at {folder} (no config.json); pass a Hugging Face model folder")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
        if method == QUANT_METHOD:
            raise ValueError(f"{folder} is already compressed by moe-compress; compress the original model instead")
        raise ValueError(f"{folder} is quantized ({method}); compress an unquantized checkpoint (bf16, fp16 or fp32)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return config, model


def open_checkpoint(folder: str | Path, trust_remote_code: bool = False) -> Checkpoint:
    """Map every experts module of the model in `folder` to its tensors on disk, without reading any weight.

    Each checkpoint name goes through the renamings and conversions transformers applies when loading, and is an
    expert tensor when it lands on a parameter of an experts module. The renamings that applied, reversed, give the
    on-disk spelling of the compressed modules' names, as save_pretrained would write them.
    """
    folder = Path(folder)
    config, model = _meta_model(folder, trust_remote_code)
    files = _weight_files(folder)
    found = find_experts(model)
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta_state = model.state_dict()
    owner = {f"{name}.{p}": (name, p) for name, m in found for p, _ in m.named_parameters(recurse=False)}
    sources: dict[str, dict[str, Source]] = defaultdict(lambda: defaultdict(Source))
    for key in sorted(files, key=dot_natural_key):  # transformers' order: experts 0..E-1
        renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if renamed not in meta_state and key in meta_state:
            renamed, pattern = key, None
        if renamed in owner:
            name, param = owner[renamed]
            source = sources[name][param]
            source.keys.append(key)
            source.patterns.append(pattern)
            source.converter = by_pattern[pattern] if pattern is not None else None
    reverse = [r.reverse_transform() for r in renamings[::-1] if r.was_used()]
    experts = []
    for name, module in found:
        missing = [p for p, _ in module.named_parameters(recurse=False) if p not in sources[name]]
        if missing:
            raise ValueError(f"{folder} has no tensors for {name}.{missing[0]}; the checkpoint is incomplete")
        saved_as = rename_source_key(name, reverse, [], reverse=True)[0]
        experts.append(ExpertsOnDisk(name, module, dict(sources[name]), saved_as))
    return Checkpoint(folder, config, model, files, experts)


def _read_param(read: Callable[[str], torch.Tensor], target: str, source: Source, model: nn.Module) -> torch.Tensor:
    if source.converter is None:
        return read(source.keys[0])
    converter = copy.deepcopy(source.converter)  # it collects tensors: one fresh copy per parameter
    for key, pattern in zip(source.keys, source.patterns):
        converter.add_tensor(target, key, pattern, lambda key=key: read(key))
    value = converter.convert(target, model=model, config=model.config)[target]
    return value[0] if isinstance(value, list) else value


def read_experts(checkpoint: Checkpoint, experts: ExpertsOnDisk, params: set[str]) -> nn.Module:
    """A stand-in for the experts module holding the named parameters read from disk in its own layout (the others
    stay on the meta device), so that discovery.split_weights reads it like a loaded model's."""
    module = copy.copy(experts.module)
    module._parameters = dict(module._parameters)
    with reading() as read:
        for param in params:
            value = _read_param(lambda key: read(checkpoint.path(key), key), f"{experts.name}.{param}",
                                experts.sources[param], checkpoint.model)
            module._parameters[param] = nn.Parameter(value, requires_grad=False)
    return module


def _params_of(module: nn.Module, projections: list[str]) -> set[str]:
    """The module parameters that hold `projections`: gate and up share gate_up_proj; biases come along."""
    names = {"gate_up_proj" if module.has_gate and p != "down" else f"{p}_proj" for p in projections}
    return names | {f"{n}_bias" for n in names if module.has_bias}


def plan(checkpoint: Checkpoint, config: CompressionConfig) -> dict[str, dict]:
    """{experts module name: spec}, every rank checked before any work."""
    specs = {}
    for experts in checkpoint.experts:
        parts = split_weights(experts.module)
        ranks = {p: choose_rank(config, p, *parts[p][0].shape) for p in projection_names(experts.module)}
        specs[experts.name] = {"form": config.form, "num_cores": config.cores, "ranks": ranks}
    return specs


def fit_unit(W: torch.Tensor, bias: torch.Tensor | None, rank: int, config: CompressionConfig,
             device: torch.device, metric: torch.Tensor | None = None, projection: str = "up", num_cores: int = 1
             ) -> tuple[dict[str, torch.Tensor], float, float | None]:
    """One projection's compressed tensors, in W's dtype on the CPU, their relative error, and their relative error
    in the calibrated metric M [E, in, in] when given; W: [E, out, in]."""
    proj = make_projection(config.form_of(projection), projection, *W.shape, rank, num_cores, bias is not None,
                           dtype=W.dtype, device=device)
    error, output_error = fit_into(proj, W, bias, config, device, metric)
    return {key: value.cpu() for key, value in proj.state_dict().items()}, error, output_error


def _unit(name: str, projection: str) -> str:
    return f"{name}.{projection}"


def fit_and_record(experts: ExpertsOnDisk, projection: str, W: torch.Tensor, bias: torch.Tensor | None, rank: int,
                   config: CompressionConfig, device: torch.device, manifest: Manifest,
                   metric: torch.Tensor | None = None, num_cores: int = 1) -> ProjectionStats:
    """Fit one unit and record it; its tensors are named as save_pretrained names the compressed module's."""
    if not torch.isfinite(W.sum(dtype=torch.float32)):  # one pass, no copy: any NaN or Inf spreads to the sum
        raise ValueError(f"{experts.name} ({projection}) holds NaN or Inf values; fix or re-download the checkpoint "
                         "before compressing")
    start = time.perf_counter()
    state, error, output_error = fit_unit(W, bias, rank, config, device, metric, projection, num_cores)
    E, out_f, in_f = W.shape
    stats = ProjectionStats(experts.name, projection, E, (out_f, in_f), rank, error, E * out_f * in_f,
                            stored_params(E, out_f, in_f, rank, num_cores, config.form_of(projection), projection),
                            time.perf_counter() - start, output_error)
    prefix = f"{experts.saved_as}.projections.{projection}"
    manifest.save(_unit(experts.name, projection), {f"{prefix}.{k}": v for k, v in state.items()},
                  dataclasses.asdict(stats))
    return stats


def fit_share(checkpoint: Checkpoint, specs: dict[str, dict], units: list[tuple[str, str]], config: CompressionConfig,
              device: torch.device, manifest: Manifest, bar: tqdm, statistics: Manifest | None = None) -> None:
    """Fit and record `units`, reading one experts module at a time and only the parameters they need; in the
    calibrated metric of `statistics` when given."""
    wanted: dict[str, list[str]] = defaultdict(list)
    for name, projection in units:
        wanted[name].append(projection)
    for experts in checkpoint.experts:
        if experts.name not in wanted:
            continue
        parts = split_weights(read_experts(checkpoint, experts, _params_of(experts.module, wanted[experts.name])))
        grams = None if statistics is None else load_statistics(statistics, experts.name)
        for projection in wanted[experts.name]:
            rank = specs[experts.name]["ranks"][projection]
            metric = None if grams is None else grams.metric(projection, config.calibration.regularisation)
            stats = fit_and_record(experts, projection, *parts[projection], rank, config, device, manifest, metric,
                                   specs[experts.name]["num_cores"])
            bar.set_postfix_str(f"{experts.name.removesuffix('.experts')[-24:]} {projection} "
                                f"err={stats.rel_error:.3f} {stats.seconds:.1f}s")
            bar.update()
        del parts, grams, metric  # before the next module's are read: one module's Grams and metric in memory at a time


def _allocated(checkpoint: Checkpoint, specs: dict[str, dict], config: CompressionConfig, device: torch.device,
               work: Path, ranks: Ranks, statistics: Manifest | None, progress: bool) -> dict[str, dict]:
    """The specs as the curves decide them (cores with num_cores=auto, then global ranks). Each process takes the
    error curves of its share of the experts modules (in the calibrated metric when there are statistics) and saves
    them with the module's spec in the work folder, where a rerun finds them; the main process allocates and passes
    the specs on."""
    folder = work / "curves"
    folder.mkdir(exist_ok=True)
    mine = set(share(list(specs), ranks))
    for experts in tqdm([e for e in checkpoint.experts if e.name in mine], desc="rank curves", unit="module",
                        disable=not progress, position=ranks.local_rank):
        path = folder / f"{experts.name}.json"
        if path.exists():
            continue
        module = read_experts(checkpoint, experts, _params_of(experts.module, list(specs[experts.name]["ranks"])))
        grams = None if statistics is None else load_statistics(statistics, experts.name)
        curves, spec = module_curves(module, experts.name, specs[experts.name], config, device, grams)
        write_atomically(path, json.dumps({"spec": spec, "curves": {p: dataclasses.asdict(c)
                                                                    for (_, p), c in curves.items()}}).encode())
    barrier()
    allocated = None
    if ranks.is_main:
        saved = {name: json.loads((folder / f"{name}.json").read_text()) for name in specs}
        allocated = {name: found["spec"] for name, found in saved.items()}
        if config.rank_allocation == "global":
            curves = {(name, p): Curve(**c) for name, found in saved.items() for p, c in found["curves"].items()}
            params_before = sum(W.numel() for e in checkpoint.experts for W, _ in split_weights(e.module).values())
            allocated = allocate_ranks(allocated, curves, config, params_before)
    return from_main(allocated)


def _settings(checkpoint: Checkpoint, config: CompressionConfig) -> dict:
    """What makes two runs the same: the source (its path, config and weight files) and the compression settings."""
    weights = {name: (checkpoint.folder / name).stat().st_size for name in sorted(set(checkpoint.files.values()))}
    source_config = hashlib.sha256((checkpoint.folder / "config.json").read_bytes()).hexdigest()
    return {"source": str(checkpoint.folder.resolve()), "source_config_sha256": source_config,
            "source_weights": weights, "compression": config.to_dict()}


def work_dir(output_dir: Path) -> Path:
    """Where a run keeps its finished units until it assembles the folder: beside the target, so that the final
    rename stays on one file system and a rerun finds it."""
    return output_dir.parent / f".{output_dir.name}.moe-compress-work"


def calibration_token_ids(folder: Path, config: CompressionConfig,
                          calibration: Calibration | None) -> torch.Tensor | None:
    """The calibration tokens [N, L]: those given, or config.calibration.source's read with the model's tokenizer;
    None when the compression is data-free."""
    if calibration is not None:
        return torch.cat(list(token_batches(calibration, config.calibration.batch_size)))
    settings = config.calibration
    if settings.source is None:
        return None
    tokenizer = load_tokenizer(folder, "calibration text needs the model's tokenizer: add its files to the folder")
    data = DataConfig(source=settings.source, subset=settings.subset, split=settings.split,
                      text_column=settings.text_column, seq_len=settings.seq_len)
    return calibration_sequences(data, tokenizer, settings.num_sequences)


def _statistics(checkpoint: Checkpoint, token_ids: torch.Tensor, config: CompressionConfig, output_dir: Path,
                device: torch.device, progress: bool) -> Manifest:
    """The calibration statistics of every experts module, gathered by every process on its share (or found saved)."""
    if config.calibration.propagate != "original":
        raise ValueError("compressing a checkpoint folder gathers its statistics on the original layers' outputs; "
                         "set compression.calibration.propagate=original, or compress the loaded model with "
                         "moe_compress.compress(model, config, calibration)")
    source = {k: v for k, v in _settings(checkpoint, config).items() if k != "compression"}
    folder = statistics_dir(output_dir, source, dataclasses.asdict(config.calibration), token_ids)
    inputs_side = lambda module: [p for p in projection_names(module) if p != "down"]  # up alone when gate-less
    read = lambda experts: read_experts(checkpoint, experts, _params_of(experts.module, inputs_side(experts.module)))
    gather_statistics(checkpoint, read, list(token_ids.split(config.calibration.batch_size)), folder, str(device),
                      progress)  # every process: each gathers on its share of the batches
    barrier()
    return Manifest(folder)


def compress_checkpoint(source: str | Path, output_dir: str | Path, config: CompressionConfig,
                        overwrite: bool = False, progress: bool = True, max_shard_size: str | int = "2GB",
                        trust_remote_code: bool = False, calibration: Calibration | None = None) -> CompressionReport:
    """Compress the checkpoint folder `source` into the compressed folder `output_dir`, one experts module in memory
    at a time; under torchrun, split across its processes. Rerunning after a crash resumes; the folder appears
    complete or not at all. Returns the report on every rank; rank 0 writes the folder.

    With calibration tokens (`calibration`, or config.calibration.source), their statistics are gathered first,
    layer by layer with the layers offloaded to disk (layerwise.py), and every fit minimises the error on the inputs
    its experts are routed; the statistics are kept beside output_dir for compressions at other sizes."""
    checkpoint = open_checkpoint(source, trust_remote_code)
    config = config.for_data(calibration is not None or config.calibration.source is not None)
    specs = plan(checkpoint, config)
    output_dir = Path(output_dir)
    if output_dir.resolve() == checkpoint.folder.resolve():
        raise ValueError(f"output_dir {output_dir} is the source folder; choose another output_dir")
    check_output_dir(output_dir, checkpoint.config, config.to_dict(), overwrite)
    units = [(name, p) for name, spec in specs.items() for p in spec["ranks"]]
    device = fit_device(config.device)
    work = work_dir(output_dir)
    token_ids = calibration_token_ids(checkpoint.folder, config, calibration)
    with distributed(device) as ranks:
        statistics = None if token_ids is None else _statistics(
            checkpoint, token_ids, config, output_dir, device, progress)
        if ranks.is_main:
            open_work_dir(work, _settings(checkpoint, config), overwrite)
        barrier()
        if curves_decide(config):
            specs = _allocated(checkpoint, specs, config, device, work, ranks, statistics, progress)
        manifest = Manifest(work, ranks.rank)
        pending = None
        if ranks.is_main:
            done = manifest.done([_unit(*u) for u in units])
            pending = [u for u in units if _unit(*u) not in done]
            if done and progress:
                print(f"resuming: {len(done)} of {len(units)} (layer, projection) units are done and verified")
        pending = from_main(pending)
        mine = share(pending, ranks)
        label = "compress" if ranks.world_size == 1 else f"compress [rank {ranks.rank}/{ranks.world_size}]"
        with tqdm(total=len(mine), desc=label, disable=not progress, position=ranks.local_rank) as bar:
            fit_share(checkpoint, specs, mine, config, device, manifest, bar, statistics)
        barrier()
        report = None
        if ranks.is_main:
            report = assemble(checkpoint, specs, config, manifest, output_dir, max_shard_size, statistics)
            shutil.rmtree(work)
        return from_main(report)


def _verified_report(config: CompressionConfig, specs: dict[str, dict], manifest: Manifest) -> CompressionReport:
    units = [_unit(name, p) for name, spec in specs.items() for p in spec["ranks"]]
    done = manifest.done(units)
    missing = [u for u in units if u not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} units, first {missing[0]}, are missing from {manifest.folder} or do not "
                           "match their checksum; on several nodes, put output_dir on a file system they all share; "
                           "then rerun the same command to refit what is missing")
    report = CompressionReport(config)
    report.rows = [ProjectionStats(**{**done[u], "shape": tuple(done[u]["shape"])}) for u in units]
    return report


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor's bytes lie in a safetensors file, and what they hold."""

    path: Path
    start: int  # offset of its first byte in the file
    size: int
    dtype: str
    shape: list[int]


def stored_tensors(path: Path) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file, from its header (8-byte little-endian length, then JSON); no data read."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    found = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        found[name] = StoredTensor(path, 8 + length + begin, end - begin, info["dtype"], info["shape"])
    return found


def _copy_bytes(tensor: StoredTensor, out: BinaryIO) -> None:
    with open(tensor.path, "rb") as src:
        src.seek(tensor.start)
        left = tensor.size
        while left:
            chunk = src.read(min(left, COPY_BUFFER))
            if not chunk:
                raise OSError(f"{tensor.path} ends inside one of its tensors; the file is truncated")
            out.write(chunk)
            left -= len(chunk)


def write_safetensors(tensors: dict[str, StoredTensor], path: Path) -> None:
    """A safetensors file of `tensors`, their bytes copied from where they lie: nothing is decoded, and memory holds
    one copy buffer whatever the sizes (safetensors' own writers take every tensor in memory at once)."""
    order = sorted(tensors, key=lambda name: (-ITEMSIZE.get(tensors[name].dtype, 1), name))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        header[name] = {"dtype": tensors[name].dtype, "shape": tensors[name].shape,
                        "data_offsets": [offset, offset + tensors[name].size]}
        offset += tensors[name].size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little") + encoded)
        for name in order:
            _copy_bytes(tensors[name], out)


def _shards(sizes: dict[str, int], max_shard_size: int) -> list[list[str]]:
    """Tensor names in natural order, cut into shards of at most `max_shard_size` bytes (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for key in sorted(sizes, key=dot_natural_key):
        if shards[-1] and filled + sizes[key] > max_shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(key)
        filled += sizes[key]
    return shards


def write_weights(tensors: dict[str, StoredTensor], folder: Path, max_shard_size: int) -> None:
    """`tensors` as Hugging Face shards in `folder`: model.safetensors, or numbered shards and their index."""
    shards = _shards({name: t.size for name, t in tensors.items()}, max_shard_size)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        write_safetensors({key: tensors[key] for key in keys}, folder / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.size for t in tensors.values())},
                 "weight_map": {key: name for name, keys in zip(names, shards) for key in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _copy_side_files(source: Path, staging: Path) -> None:
    """Tokenizer, generation config, chat template, licence...: every file of the source but weights, config.json and
    the model card, which the compressed folder has its own of."""
    for path in source.iterdir():
        side = not any(path.match(p) for p in WEIGHT_FILES) and path.name not in ("config.json", "README.md")
        if path.is_file() and side and not path.name.startswith("."):
            shutil.copy2(path, staging / path.name)


def assemble(checkpoint: Checkpoint, specs: dict[str, dict], config: CompressionConfig, manifest: Manifest,
             output_dir: Path, max_shard_size: str | int, statistics: Manifest | None = None) -> CompressionReport:
    """Write the compressed folder from the verified units and the source's other tensors and files: sharded
    safetensors, config.json with the quantization_config, tokenizer and generation files, model card, report and
    error heat map. Built in the work folder and renamed into place."""
    report = _verified_report(config, specs, manifest)
    if statistics is not None:
        report.coverage = {name: load_token_counts(statistics, name) for name in specs}
        warn_starved(report.coverage, {e.name: split_weights(e.module)["up"][0].shape[-1] for e in checkpoint.experts})
    staging = manifest.folder / "assembled"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    source = {path: stored_tensors(path) for path in {checkpoint.path(key) for key in checkpoint.other_keys}}
    tensors = {key: source[checkpoint.path(key)][key] for key in checkpoint.other_keys}
    for name, spec in specs.items():
        for projection in spec["ranks"]:
            tensors.update(stored_tensors(manifest.path(_unit(name, projection))))
    write_weights(tensors, staging, convert_file_size_to_int(max_shard_size))
    attach_quantization_config(checkpoint.model, specs, config, report)
    source_config = json.loads((checkpoint.folder / "config.json").read_text())
    source_config["quantization_config"] = checkpoint.model.config.quantization_config.to_dict()
    (staging / "config.json").write_text(json.dumps(mark_dict(source_config), indent=2, sort_keys=True) + "\n")
    write_shim(staging)
    _copy_side_files(checkpoint.folder, staging)
    (staging / "README.md").write_text(model_card(checkpoint.model))
    save_report(report, staging)
    _replace(staging, output_dir)
    return report


def layer_table(report: CompressionReport) -> list[dict]:
    """Per experts module: the relative error and rank of each projection and the parameters before and after."""
    layers: dict[str, dict] = {}
    for row in report.rows:
        layer = layers.setdefault(row.module, {"module": row.module, "rel_error": {}, "rank": {}, "params_before": 0,
                                               "params_after": 0})
        layer["rel_error"][row.projection] = row.rel_error
        layer["rank"][row.projection] = row.rank
        layer["params_before"] += row.params_before
        layer["params_after"] += row.params_after
    return list(layers.values())


def plot_errors(report: CompressionReport, path: Path) -> None:
    """A heat map of relative error by projection (rows) and layer (columns); values and ranks written in the cells
    of models shallow enough to read them. The figure's size is capped: a 160-layer model's map stays small in memory
    too."""
    layers = layer_table(report)
    projections = [p for p in ("gate", "up", "down") if any(p in layer["rel_error"] for layer in layers)]
    errors = [[layer["rel_error"].get(p, float("nan")) for layer in layers] for p in projections]
    ranks = [[layer["rank"].get(p) for layer in layers] for p in projections]
    labels = [layer["module"].removesuffix(".mlp.experts").removesuffix(".experts").removeprefix("model.")
              for layer in layers]
    fig = Figure(figsize=(min(16.0, 2.5 + 0.55 * len(layers)), 1.6 + 0.45 * len(projections)))  # no pyplot state
    ax = fig.subplots()
    image = ax.imshow(errors, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(projections)), projections)
    ticks = range(0, len(layers), max(1, len(layers) // 24))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7)
    if len(layers) <= 24:
        for i, row in enumerate(errors):
            for j, value in enumerate(row):
                dark = image.norm(value) < 0.6  # viridis runs from dark blue to bright yellow
                ax.text(j, i, f"{value:.3f}\nr={ranks[i][j]}", ha="center", va="center", fontsize=6,
                        color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label="relative error")
    ax.set_title(f"{report.config.method}, {report.config.rank_allocation} ranks: error by layer and projection",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_coverage(coverage: dict[str, list[int]], path: Path) -> None:
    """Calibration tokens routed to each expert (columns) of each layer (rows), on a log colour scale, the starved
    ones (fewer than one token) in the colour map's 'under' colour."""
    from matplotlib.colors import LogNorm

    names = list(coverage)
    tokens = [[max(n, 0.5) for n in coverage[name]] for name in names]
    fig = Figure(figsize=(min(16.0, 3 + 0.12 * len(tokens[0])), min(12.0, 1.5 + 0.3 * len(names))))
    ax = fig.subplots()
    image = ax.imshow(tokens, cmap="viridis", aspect="auto", interpolation="nearest", norm=LogNorm(vmin=1))
    ax.set_yticks(range(len(names)), [n.removesuffix(".mlp.experts").removeprefix("model.") for n in names],
                  fontsize=7)
    ax.set_xlabel("expert")
    fig.colorbar(image, ax=ax, label="calibration tokens routed to it")
    ax.set_title("calibration coverage: tokens per expert and layer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save_report(report: CompressionReport, folder: Path) -> None:
    """compression_report.json (totals, per (layer, projection) rows, per-layer table, calibration coverage),
    compression_error.png and, with calibration data, calibration_coverage.png."""
    table = {**report.to_dict(), "layers": layer_table(report)}
    (folder / "compression_report.json").write_text(json.dumps(table, indent=2) + "\n")
    plot_errors(report, folder / "compression_error.png")
    if report.coverage:
        plot_coverage(report.coverage, folder / "calibration_coverage.png")
