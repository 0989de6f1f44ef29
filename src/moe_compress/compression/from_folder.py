"""compress_checkpoint(source, output_dir, config): compress a safetensors checkpoint folder without loading the model.

The model is built on the meta device only to find its experts modules (checkpoint_index.py). Their tensors are read
one experts module at a time straight from the shards, fitted by the engine, written, and freed; everything else is
copied through byte for byte under its on-disk name. Peak memory is one experts module and the fit's working set,
whatever the model's size. What is this driver's own: the (layer, projection) units split across torchrun's
processes, each finished unit recorded in a manifest so that a rerun resumes (moe_compress.parallel), a lock that
keeps a second run out of the same output folder, and the assembly of the folder. Shapes: E experts, out x in a
projection's matrices, r rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers.utils.hub import convert_file_size_to_int

from moe_compress.calibration.grams import ExpertGrams
from moe_compress.calibration.observe import Calibration, token_batches
from moe_compress.calibration.offloaded import gather_statistics
from moe_compress.calibration.store import (load_block_data, load_sensitivity, load_statistics, load_token_counts,
                                           statistics_dir)
from moe_compress.compression import bits, engine
from moe_compress.compression.allocation import Curve
from moe_compress.compression.budget import stored_params
from moe_compress.compression.checkpoint_index import SourceCheckpoint, block_name, open_checkpoint, params_of, \
    read_block, read_experts
from moe_compress.compression.config import CompressionConfig
from moe_compress.compression.fitting import Weights
from moe_compress.compression.reconstruction import reconstruct, router_parameters
from moe_compress.compression.report import BlockError, CompressionReport, ProjectionStats
from moe_compress.discovery import projection_names, split_weights
from moe_compress.experts import ModuleSpec, SharedCoreExperts
from moe_compress.folder.marking import mark_dict, write_shim
from moe_compress.folder.save import attach_quantization_config, check_output_dir, model_card, no_space, \
    replace_folder
from moe_compress.folder.shards import stored_tensors, write_weights
from moe_compress.parallel import Manifest, Ranks, barrier, distributed, fit_device, from_main, open_work_dir, share, \
    write_atomically

WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.gguf")


class CheckpointFolder:
    """A checkpoint folder as the engine's experts source: its experts modules read from the shards one at a time,
    and their statistics read from the store the offloaded calibration pass filled (None: data-free)."""

    def __init__(self, checkpoint: SourceCheckpoint, store: Optional[Manifest] = None):
        self.checkpoint, self.store = checkpoint, store
        self.calibrated = store is not None
        self.on_disk = {experts.name: experts for experts in checkpoint.experts}

    def experts(self) -> list:
        return [(experts.name, experts.module) for experts in self.checkpoint.experts]

    def read(self, name: str, projections: Sequence[str]) -> Weights:
        experts = self.on_disk[name]
        parts = split_weights(read_experts(self.checkpoint, experts, params_of(experts.module, list(projections))))
        return {p: parts[p] for p in projections}

    def statistics(self, names: Collection[str], recompute: bool) -> Iterator[dict[str, ExpertGrams]]:
        # compress_checkpoint refuses propagate=compressed before any work: the store holds the original layers'
        for name in self.on_disk:
            if name in names:
                yield {name: load_statistics(self.store, name)}


def unit_name(name: str, projection: str) -> str:
    return f"{name}.{projection}"


def reconstructed_unit(name: str) -> str:
    """The unit of an experts module reconstructed within its block: every projection's tensors (and the router's)."""
    return f"{name}.reconstructed"


def work_dir(output_dir: Path) -> Path:
    """Where a run keeps its finished units until it assembles the folder: beside the target, so that the final
    rename stays on one file system and a rerun finds it."""
    return output_dir.parent / f".{output_dir.name}.moe-compress-work"


def lock_path(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.moe-compress.lock"


@contextmanager
def exclusive(output_dir: Path, ranks: Ranks) -> Iterator[None]:
    """The run's hold on `output_dir` for the block: a second run on the same folder is refused in one line naming
    the first. The lock is the operating system's (filelock), so a killed run holds nothing."""
    lock = FileLock(lock_path(output_dir))
    owner = lock_path(output_dir).with_suffix(".owner")
    refused = None
    if ranks.is_main:
        try:
            lock.acquire(timeout=0)
            owner.write_text(f"process {os.getpid()} on {socket.gethostname()}, started "
                             f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        except Timeout:
            refused = owner.read_text() if owner.exists() else "another process"
    refused = from_main(refused)
    if refused is not None:
        raise FileExistsError(f"{output_dir} is being written by another moe-compress run ({refused}); wait for it "
                              "to end (rerunning the same command then resumes or finds it done), or choose another "
                              "output_dir")
    try:
        yield
    finally:
        if ranks.is_main:
            owner.unlink(missing_ok=True)
            lock.release()
            lock_path(output_dir).unlink(missing_ok=True)  # nothing of the run is left beside its folder


def source_settings(checkpoint: SourceCheckpoint) -> dict:
    """What identifies the source: its path, config and weight files."""
    weights = {name: (checkpoint.folder / name).stat().st_size for name in sorted(set(checkpoint.files.values()))}
    source_config = hashlib.sha256((checkpoint.folder / "config.json").read_bytes()).hexdigest()
    return {"source": str(checkpoint.folder.resolve()), "source_config_sha256": source_config,
            "source_weights": weights}


def calibration_token_ids(folder: Path, config: CompressionConfig,
                          calibration: Optional[Calibration]) -> Optional[torch.Tensor]:
    """The calibration tokens [N, L]: those given, or config.calibration.data's read with the model's tokenizer;
    None when the compression is data-free."""
    if calibration is not None:
        return torch.cat(list(token_batches(calibration, config.calibration.batch_size)))
    return engine.calibration_text(config, folder)


def gathered_statistics(checkpoint: SourceCheckpoint, token_ids: torch.Tensor, config: CompressionConfig,
                        output_dir: Path, device: torch.device, ranks: Ranks, progress: bool) -> Manifest:
    """The calibration statistics of every experts module, gathered by every process on its share of the batches
    (or found saved). A run gathering the same statistics for another output folder is waited for."""
    keep_inputs = engine.kept_inputs(config)
    identity = {**config.calibration.statistics_identity(), **({"kept_inputs": keep_inputs} if keep_inputs else {})}
    folder = statistics_dir(output_dir, source_settings(checkpoint), identity, token_ids)
    lock = FileLock(folder.with_name(folder.name + ".lock"))
    if ranks.is_main:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"waiting for another run gathering the same calibration statistics in {folder}", flush=True)
            lock.acquire()
    try:
        inputs_side = lambda module: [p for p in projection_names(module) if p != "down"]  # up alone when gate-less
        read = lambda experts: read_experts(checkpoint, experts, params_of(experts.module, inputs_side(experts.module)))
        gather_statistics(checkpoint, read, list(token_ids.split(config.calibration.batch_size)), folder, str(device),
                          progress, keep_inputs, engine.weighs(config))
        barrier()
    finally:
        if ranks.is_main:
            lock.release()
            Path(lock.lock_file).unlink(missing_ok=True)
    return Manifest(folder)


def allocated(source: CheckpointFolder, specs: dict[str, ModuleSpec], config: CompressionConfig,
              device: torch.device, work: Path, ranks: Ranks, progress: bool) -> dict[str, ModuleSpec]:
    """The specs as the curves decide them. Each process takes the error curves of its share of the experts modules
    and saves them with the module's spec in the work folder, where a rerun finds them; the main process allocates
    and passes the specs on."""
    folder = work / "curves"
    folder.mkdir(exist_ok=True)
    mine = [name for name in share(list(specs), ranks) if not (folder / f"{name}.json").exists()]
    with tqdm(total=len(mine), desc="rank curves", unit="module", disable=not progress,
              position=ranks.local_rank) as bar:
        for name, curves, spec in engine.curves(source, specs, mine, config, device, bar):
            record = {"spec": spec.to_dict(), "curves": {p: dataclasses.asdict(c) for p, c in curves.items()}}
            write_atomically(folder / f"{name}.json", json.dumps(record).encode())
    barrier()
    chosen = None
    if ranks.is_main:
        saved = {name: json.loads((folder / f"{name}.json").read_text()) for name in specs}
        found = {name: ({p: Curve(**c) for p, c in record["curves"].items()}, ModuleSpec.from_dict(record["spec"]))
                 for name, record in saved.items()}
        chosen = engine.allocated_specs(config, found, engine.params_before(source))
    return from_main(chosen)


def fit_share(source: CheckpointFolder, specs: dict[str, ModuleSpec], units: list[tuple[str, str]],
              config: CompressionConfig, device: torch.device, manifest: Manifest, bar: tqdm) -> None:
    """Fit and record `units`, one experts module at a time; their tensors are named as save_pretrained names the
    compressed module's."""
    wanted: dict[str, list[str]] = {}
    for name, projection in units:
        wanted.setdefault(name, []).append(projection)
    for fitted in engine.fitted_modules(source, specs, wanted, config, device, bar):
        prefix = source.on_disk[fitted.name].saved_as
        for row in fitted.rows:
            state = fitted.projections[row.projection].state_dict()
            tensors = {f"{prefix}.projections.{row.projection}.{k}": v.cpu() for k, v in state.items()}
            manifest.save(unit_name(fitted.name, row.projection), tensors, dataclasses.asdict(row))


def reconstruct_share(source: CheckpointFolder, specs: dict[str, ModuleSpec], names: list[str],
                      config: CompressionConfig, device: torch.device, manifest: Manifest, bar: tqdm) -> None:
    """Reconstruct and record the experts modules `names`, one block at a time: the block read from disk with its
    original experts, the fitted module from its units, the inputs from the statistics store. Each module's unit
    holds its projections' tensors and, with the router trained, the router's under their on-disk names."""
    for name in names:
        on_disk = source.on_disk[name]
        block, original = read_block(source.checkpoint, on_disk)
        block.to(device)
        compressed = SharedCoreExperts.empty(original, specs[name])
        state = {}
        for projection in specs[name].ranks:
            state.update(load_file(manifest.path(unit_name(name, projection)), device=str(device)))
        compressed.load_state_dict({key.removeprefix(f"{on_disk.saved_as}."): value for key, value in state.items()})
        inputs, targets = load_block_data(source.store, name)
        weights = load_sensitivity(source.store, name) if config.reconstruction.weighting == "loss" else None
        error = reconstruct(name, block, original, compressed, inputs, config.reconstruction, config.seed,
                            targets=targets, weights=weights)
        tensors = {f"{on_disk.saved_as}.{key}": value.cpu() for key, value in compressed.state_dict().items()}
        if config.reconstruction.router:
            routers = {id(p) for p in router_parameters(block, compressed)}
            stored_as = source.checkpoint.stored_as
            tensors.update({stored_as[f"{block_name(on_disk)}.{key}"]: p.detach().cpu()
                            for key, p in block.named_parameters() if id(p) in routers})
        manifest.save(reconstructed_unit(name), tensors, dataclasses.asdict(error))
        bar.set_postfix_str(f"{name.removesuffix('.experts')[-24:]} block err {error.before:.3f} -> "
                            f"{error.after:.3f} {error.seconds:.1f}s")
        bar.update()


def verified_report(config: CompressionConfig, specs: dict[str, ModuleSpec], manifest: Manifest) -> CompressionReport:
    fitted = [unit_name(name, p) for name, spec in specs.items() for p in spec.ranks]
    reconstructed = [reconstructed_unit(name) for name in specs] if config.reconstruction.on else []
    units = fitted + reconstructed
    done = manifest.done(units)
    missing = [u for u in units if u not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} units, first {missing[0]}, are missing from {manifest.folder} or do not "
                           "match their checksum; on several nodes, put output_dir on a file system they all share; "
                           "then rerun the same command to refit what is missing")
    blocks = [BlockError(**done[unit]) for unit in reconstructed]
    return CompressionReport(config, [ProjectionStats(**{**done[u], "shape": tuple(done[u]["shape"])})
                                      for u in fitted], blocks=blocks)


def copy_side_files(source: Path, staging: Path) -> None:
    """Tokenizer, generation config, chat template, licence...: every file of the source but weights, config.json and
    the model card, which the compressed folder has its own of."""
    for path in source.iterdir():
        side = not any(path.match(p) for p in WEIGHT_FILES) and path.name not in ("config.json", "README.md")
        if path.is_file() and side and not path.name.startswith("."):
            shutil.copy2(path, staging / path.name)


def assemble(source: CheckpointFolder, specs: dict[str, ModuleSpec], config: CompressionConfig, manifest: Manifest,
             output_dir: Path, max_shard_size: str | int, record: CompressionConfig,
             choice: Optional[dict] = None) -> CompressionReport:
    """Write the compressed folder from the verified units and the source's other tensors and files: sharded
    safetensors, config.json with the quantization_config (`record`: the settings as asked), tokenizer and generation
    files, model card, report and error heat map. Built in the work folder and renamed into place."""
    report = verified_report(config, specs, manifest)
    coverage = {name: load_token_counts(source.store, name) for name in specs} if source.calibrated else {}
    blocks = report.blocks
    report = engine.report_of(config, report.rows, coverage, source)
    report.choice, report.blocks = choice, blocks
    staging = manifest.folder / "assembled"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_folder(source, specs, record, manifest, report, staging, max_shard_size)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a full disk: what it took is given back before the message
        raise
    replace_folder(staging, output_dir)
    return report


def write_folder(source: CheckpointFolder, specs: dict[str, ModuleSpec], record: CompressionConfig,
                 manifest: Manifest, report: CompressionReport, staging: Path, max_shard_size: str | int) -> None:
    checkpoint = source.checkpoint
    files = {path: stored_tensors(path) for path in {checkpoint.path(key) for key in checkpoint.other_keys}}
    tensors = {key: files[checkpoint.path(key)][key] for key in checkpoint.other_keys}
    for name, spec in specs.items():
        for projection in spec.ranks:
            tensors.update(stored_tensors(manifest.path(unit_name(name, projection))))
        if report.blocks:  # the reconstructed tensors over the fitted ones (and the router's over the source's)
            tensors.update(stored_tensors(manifest.path(reconstructed_unit(name))))
    write_weights(tensors, staging, convert_file_size_to_int(max_shard_size))
    attach_quantization_config(checkpoint.model, specs, record, report)
    source_config = json.loads((checkpoint.folder / "config.json").read_text())
    source_config["quantization_config"] = checkpoint.model.config.quantization_config.to_dict()
    (staging / "config.json").write_text(json.dumps(mark_dict(source_config), indent=2, sort_keys=True) + "\n")
    write_shim(staging)
    copy_side_files(checkpoint.folder, staging)
    (staging / "README.md").write_text(model_card(checkpoint.model))
    report.save(staging)


def expected_bytes(source: CheckpointFolder, specs: dict[str, ModuleSpec], pending: float) -> int:
    """About what a run writes from here on: the `pending` fraction of the units, then the whole folder, assembled in
    the work folder (the rename into place writes nothing). The compressed experts take the source's expert bytes
    times the kept fraction; every other tensor is copied as it is."""
    checkpoint = source.checkpoint
    sizes = {}
    for path in {checkpoint.path(key) for key in checkpoint.files}:
        sizes.update({key: tensor.size for key, tensor in stored_tensors(path).items()})
    other = sum(sizes[key] for key in checkpoint.other_keys)
    experts = sum(sizes.values()) - other
    kept = sum(stored_params(*W.shape, spec.ranks[p], spec.num_cores, spec.form_of(p), p)
               for (name, module), spec in zip(source.experts(), specs.values())
               for p, (W, _) in split_weights(module).items()) / engine.params_before(source)
    return int(experts * kept * (1 + pending) + other)


def compress_checkpoint(source: str | Path, output_dir: str | Path, config: CompressionConfig,
                        overwrite: bool = False, progress: bool = True, max_shard_size: str | int = "2GB",
                        trust_remote_code: bool = False, calibration: Calibration | None = None) -> CompressionReport:
    """Compress the checkpoint folder `source` into the compressed folder `output_dir`, one experts module in memory
    at a time; under torchrun, split across its processes. Rerunning after a crash resumes; the folder appears
    complete or not at all. Returns the report on every rank; rank 0 writes the folder.

    With calibration tokens (`calibration`, or config.calibration.data), their statistics are gathered first, layer
    by layer with the layers offloaded to disk (calibration/offloaded.py), and every fit minimises the error on the
    inputs its experts are routed; the statistics are kept beside output_dir for compressions at other sizes."""
    checkpoint = open_checkpoint(source, trust_remote_code)
    token_ids = calibration_token_ids(checkpoint.folder, config, calibration)
    record = config.for_data(token_ids is not None)  # what the folder records: target_bits as asked, not as chosen
    if record.reconstruction.on and record.reconstruction.objective != "block":
        raise ValueError("a checkpoint folder's reconstruction matches each block's output; set "
                         "compression.reconstruction.objective=block, or compress the loaded model with "
                         "moe_compress.compress(model, config, calibration)")
    if token_ids is not None and record.calibration.propagate != "original":
        raise ValueError("compressing a checkpoint folder gathers its statistics on the original layers' outputs; "
                         "set compression.calibration.propagate=original, or compress the loaded model with "
                         "moe_compress.compress(model, config, calibration)")
    folder = CheckpointFolder(checkpoint)
    specs = engine.plan(folder, record) if record.target_bits is None else {}  # bad ranks refused before any work
    output_dir = Path(output_dir)
    if output_dir.resolve() == checkpoint.folder.resolve():
        raise ValueError(f"output_dir {output_dir} is the source folder; choose another output_dir")
    check_output_dir(output_dir, checkpoint.config, record.to_dict(), overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    device = fit_device(config.device)
    work = work_dir(output_dir)
    units = []
    kept = lambda: (f"the {len(Manifest(work).records())} finished (layer, projection) units in {work} are kept, and "
                    "the same command resumes from them")
    needed = lambda: expected_bytes(folder, specs, 1 - len(Manifest(work).records()) / max(1, len(units)))
    with distributed(device) as ranks, exclusive(output_dir, ranks), no_space(output_dir, needed, kept):
        if ranks.is_main:
            open_work_dir(work, {**source_settings(checkpoint), "compression": record.to_dict()}, overwrite)
        barrier()
        if token_ids is not None:
            folder = CheckpointFolder(checkpoint, gathered_statistics(checkpoint, token_ids, record, output_dir,
                                                                      device, ranks, progress))
        config, choice = record, None
        if record.target_bits is not None:  # chosen once, on the main process, for all
            config, choice = from_main(bits.choose(folder, record, device, progress) if ranks.is_main else None)
            specs = engine.plan(folder, config)
        if engine.curves_decide(config):
            specs = allocated(folder, specs, config, device, work, ranks, progress)
        units = [(name, p) for name, spec in specs.items() for p in spec.ranks]
        manifest = Manifest(work, ranks.rank)
        pending = None
        if ranks.is_main:
            done = manifest.done([unit_name(*u) for u in units])
            pending = [u for u in units if unit_name(*u) not in done]
            if done and progress:
                print(f"resuming: {len(done)} of {len(units)} (layer, projection) units are done and verified")
        pending = from_main(pending)
        mine = share(pending, ranks)
        with tqdm(total=len(mine), desc=ranks.label("compress"), disable=not progress, position=ranks.local_rank) as bar:
            fit_share(folder, specs, mine, config, device, manifest, bar)
        barrier()
        if config.reconstruction.on:
            pending = None
            if ranks.is_main:
                done = manifest.done([reconstructed_unit(name) for name in specs])
                pending = [name for name in specs if reconstructed_unit(name) not in done]
                if done and progress:
                    print(f"resuming: {len(done)} of {len(specs)} blocks are reconstructed and verified")
            mine = share(from_main(pending), ranks)
            with tqdm(total=len(mine), desc=ranks.label("reconstruct"), unit="block",
                      disable=not progress, position=ranks.local_rank) as bar:
                reconstruct_share(folder, specs, mine, config, device, manifest, bar)
            barrier()
        report = None
        if ranks.is_main:
            report = assemble(folder, specs, config, manifest, output_dir, max_shard_size, record, choice)
            shutil.rmtree(work)
        return from_main(report)
