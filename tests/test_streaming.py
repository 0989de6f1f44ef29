"""compress_checkpoint: a checkpoint folder compressed without loading the model, against the in-memory compress()."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_model, token_ids
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moe_compress as mc
from moe_compress.parallel import Manifest
from moe_compress import compress_checkpoint
from moe_compress.compression.checkpoint_index import can_stream
from moe_compress.compression.from_folder import work_dir
from moe_compress.testbed import TESTBED_DIR

CONFIG = mc.CompressionConfig(rank=2, polish_steps=5)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the machine is small and shared, and the fits are bit-identical only at equal counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def source(tmp_path: Path, model_type: str = "qwen3_moe", layout: str = "per-expert", dtype=torch.float32,
           **overrides) -> Path:
    """A tiny model's checkpoint folder: as save_pretrained writes it (per-expert 2-D tensors for Qwen3-MoE and
    Mixtral, the hub layout; sharded), or with the fused 3-D tensors the model holds."""
    model = tiny_model(model_type, **overrides).to(dtype)
    folder = tmp_path / f"{model_type}-{layout}"
    if layout == "per-expert":
        model.save_pretrained(folder, max_shard_size="20KB")
    else:
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):  # any tokenizer: the run copies it through as is
        shutil.copy(TESTBED_DIR / name, folder / name)
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def disk_keys(folder: Path) -> list[str]:
    keys = []
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            keys += list(f.keys())
    return keys


@pytest.mark.parametrize("model_type,layout,dtype,expert_key", [
    ("qwen3_moe", "per-expert", torch.float32, "model.layers.0.mlp.experts.3.gate_proj.weight"),
    ("qwen3_moe", "fused", torch.bfloat16, "model.layers.0.mlp.experts.gate_up_proj"),
    ("mixtral", "per-expert", torch.float32, "model.layers.0.block_sparse_moe.experts.3.w1.weight"),
    ("gpt_oss", "fused", torch.float32, "model.layers.0.mlp.experts.gate_up_proj_bias"),  # transposed, interleaved
])
def test_streamed_folder_equals_the_in_memory_compression(tmp_path, model_type, layout, dtype, expert_key):
    src = source(tmp_path, model_type, layout, dtype)
    assert expert_key in disk_keys(src)
    report = compress_checkpoint(src, tmp_path / "streamed", CONFIG, progress=False, max_shard_size="20KB")

    model = tiny_model(model_type).to(dtype)
    reference = mc.compress(model, CONFIG, progress=False)
    mc.save_compressed(model, tmp_path / "in-memory")
    streamed, expected = tensors(tmp_path / "streamed"), tensors(tmp_path / "in-memory")
    assert streamed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(streamed[key], expected[key]), key
    assert [(r.module, r.projection, r.rank, r.rel_error) for r in report.rows] == \
           [(r.module, r.projection, r.rank, r.rel_error) for r in reference.rows]
    assert len(list((tmp_path / "streamed").glob("model-*.safetensors"))) > 1
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "streamed" / name).read_bytes() == (src / name).read_bytes()
    with torch.no_grad():
        logits = mc.load_compressed(tmp_path / "streamed", dtype=dtype)(token_ids()).logits
        assert torch.equal(logits, mc.load_compressed(tmp_path / "in-memory", dtype=dtype)(token_ids()).logits)
        # the live model differs from any reloaded one in bf16 (its rotary buffers were cast with it)
        tolerance = 0 if dtype == torch.float32 else 1e-2
        assert torch.allclose(logits.float(), model(token_ids()).logits.float(), rtol=0, atol=tolerance)


def test_report_table_and_heat_map_in_the_folder(tmp_path):
    out = tmp_path / "sc"
    report = compress_checkpoint(source(tmp_path), out, CONFIG, progress=False)
    saved = json.loads((out / "compression_report.json").read_text())
    assert saved["params_after"] == report.params_after and len(saved["rows"]) == 6
    assert [layer["module"] for layer in saved["layers"]] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    layer = saved["layers"][1]
    assert layer["rel_error"] == {r.projection: r.rel_error for r in report.rows[3:]}
    assert layer["params_before"] == 3 * 4 * 32 * 32 and layer["params_after"] == sum(r.params_after for r in report.rows[3:])
    assert (out / "compression_error.png").stat().st_size > 5_000
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "moe_compress" and quant["stats"]["params_after"] == report.params_after
    assert f"{report.params_before:,} -> {report.params_after:,}" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen3_moe-per-expert", "sc"]  # no work folder left


RUN = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    import moe_compress as mc
    from moe_compress import compress_checkpoint
    compress_checkpoint(sys.argv[1], sys.argv[2], mc.CompressionConfig(**json.loads(sys.argv[3])), progress=False)
""")


@pytest.mark.slow
def test_a_killed_run_resumes_verifies_and_ends_as_a_clean_run(tmp_path, capsys):
    src = source(tmp_path, num_hidden_layers=4)
    settings = {"rank": 2, "polish_steps": 300}
    out = tmp_path / "sc"
    manifest = Manifest(work_dir(out))
    child = subprocess.Popen([sys.executable, "-c", RUN, str(src), str(out), json.dumps(settings)])
    while len(manifest.records()) < 2:
        assert child.poll() is None, f"the run ended (exit {child.returncode}) before it could be killed"
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    units = [f"model.layers.{i}.mlp.experts.{p}" for i in range(4) for p in ("gate", "up", "down")]
    done = manifest.done(units)
    assert 2 <= len(done) < len(units) and not out.exists()
    corrupted = manifest.path(next(iter(done)))
    data = bytearray(corrupted.read_bytes())
    data[-4:] = b"\xff\xff\xff\xff"  # bit rot in a finished unit: its checksum no longer matches
    corrupted.write_bytes(bytes(data))
    with open(manifest.own, "a") as f:
        f.write('{"unit": "model.layers.3.mlp.experts.down", "sha')  # a record torn by the kill

    config = mc.CompressionConfig(**settings)
    compress_checkpoint(src, out, config)
    assert f"resuming: {len(done) - 1} of {len(units)} (layer, projection) units are done" in capsys.readouterr().out
    compress_checkpoint(src, tmp_path / "clean", config, progress=False)
    resumed, clean = tensors(out), tensors(tmp_path / "clean")
    assert resumed.keys() == clean.keys() and all(torch.equal(resumed[k], clean[k]) for k in clean)
    assert not work_dir(out).exists()


RUN_CALIBRATED = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from safetensors.torch import load_file
    import moe_compress as mc
    ids = load_file(sys.argv[4])["ids"]
    mc.compress_checkpoint(sys.argv[1], sys.argv[2], mc.CompressionConfig(**json.loads(sys.argv[3])),
                           calibration=ids, progress=False)
""")


def killed_when(tmp_path: Path, args: list[str], ready) -> None:
    """Run RUN_CALIBRATED with `args` and SIGKILL it as soon as ready() holds."""
    child = subprocess.Popen([sys.executable, "-c", RUN_CALIBRATED, *args])
    while not ready():
        assert child.poll() is None, f"the run ended (exit {child.returncode}) before it could be killed"
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["statistics", "fits"])
def test_a_calibrated_run_killed_in_its_statistics_pass_or_its_fits_resumes_to_a_clean_run(tmp_path, capsys, stage):
    """Killed while the statistics are gathered (some layers' saved) or while the fits run (some units recorded), the
    rerun keeps what is saved and ends bit-identical to a clean run that gathered its statistics afresh."""
    src = source(tmp_path, num_hidden_layers=6)
    ids_file = tmp_path / "ids.safetensors"
    save_file({"ids": token_ids(48, 64, seed=3)}, ids_file)  # enough tokens that a layer's pass takes a while
    settings = {"rank": 2, "polish_steps": 0}
    out = tmp_path / "sc"
    stores = lambda: list(tmp_path.glob(".moe-compress-statistics-*[!k]"))  # the folder, not its .lock
    layers = [f"model.layers.{i}.mlp.experts" for i in range(6)]
    saved = lambda: Manifest(stores()[0]).done(layers) if stores() else {}
    if stage == "statistics":
        killed_when(tmp_path, [str(src), str(out), json.dumps(settings), str(ids_file)],
                    lambda: 1 <= len(saved()) < len(layers) - 1)
        kept = {name: Manifest(stores()[0]).path(name).stat().st_mtime_ns for name in saved()}
        assert 1 <= len(kept) < len(layers) and not list(work_dir(out).glob("units/*.safetensors"))
    else:
        manifest = Manifest(work_dir(out))
        killed_when(tmp_path, [str(src), str(out), json.dumps(settings), str(ids_file)],
                    lambda: len(manifest.records()) >= 2)
        assert len(saved()) == len(layers) and 2 <= len(manifest.done([f"{n}.{p}" for n in layers
                                                                       for p in ("gate", "up", "down")])) < 18
        kept = {}
    assert not out.exists()
    config = mc.CompressionConfig(**settings)
    ids = load_file(ids_file)["ids"]
    compress_checkpoint(src, out, config, calibration=ids)
    assert all(Manifest(stores()[0]).path(name).stat().st_mtime_ns == stamp for name, stamp in kept.items())
    if stage == "fits":
        assert "resuming: " in capsys.readouterr().out
    (tmp_path / "apart").mkdir()  # another parent folder: the clean run gathers its own statistics
    compress_checkpoint(src, tmp_path / "apart" / "clean", config, calibration=ids, progress=False)
    assert len(list((tmp_path / "apart").glob(".moe-compress-statistics-*"))) == 1
    resumed, clean = tensors(out), tensors(tmp_path / "apart" / "clean")
    assert resumed.keys() == clean.keys() and all(torch.equal(resumed[k], clean[k]) for k in clean)


def test_other_settings_are_refused_unless_overwrite(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 3, 4] = float("nan")
    src = tmp_path / "nan"
    model.save_pretrained(src)
    # layer 0 is fitted and written before layer 1's NaN stops the run: unfinished work is left
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.experts \(down\) holds NaN or Inf"):
        compress_checkpoint(src, tmp_path / "sc", CONFIG, progress=False)
    other = mc.CompressionConfig(rank=1, polish_steps=5)
    with pytest.raises(FileExistsError, match=r"unfinished work of a run with other settings "
                                              r"\(compression.rank: 2 then, 1 now\);.*pass overwrite=True"):
        compress_checkpoint(src, tmp_path / "sc", other, progress=False)
    with pytest.raises(ValueError, match="NaN"):  # past the refusal: the old work is gone, the new one starts
        compress_checkpoint(src, tmp_path / "sc", other, overwrite=True, progress=False)
    assert json.loads((work_dir(tmp_path / "sc") / "settings.json").read_text())["compression"]["rank"] == 1

    good = source(tmp_path)
    compress_checkpoint(good, tmp_path / "done", CONFIG, progress=False)
    with pytest.raises(FileExistsError, match="already holds a different model .* pass overwrite=True"):
        compress_checkpoint(good, tmp_path / "done", other, progress=False)
    compress_checkpoint(good, tmp_path / "done", other, overwrite=True, progress=False)
    assert json.loads((tmp_path / "done" / "config.json").read_text())["quantization_config"]["compression"]["rank"] == 1


def test_bad_sources_are_refused_before_any_write(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder at .*nowhere"):
        compress_checkpoint(tmp_path / "nowhere", tmp_path / "out", CONFIG)
    model = tiny_model()
    model.save_pretrained(tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").rename(tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="holds no safetensors weights"):
        compress_checkpoint(tmp_path / "bin", tmp_path / "out", CONFIG)
    assert not can_stream(tmp_path / "bin") and not can_stream(tmp_path / "nowhere") and can_stream(TESTBED_DIR)
    with pytest.raises(mc.RankTooLargeError, match="rank 6 stores more than the original"):
        compress_checkpoint(source(tmp_path), tmp_path / "out", mc.CompressionConfig(rank=6))
    with pytest.raises(ValueError, match="is the source folder; choose another output_dir"):
        compress_checkpoint(source(tmp_path, layout="fused"), tmp_path / "qwen3_moe-fused", CONFIG, overwrite=True)
    mc.compress(model, CONFIG, progress=False)
    mc.save_compressed(model, tmp_path / "compressed")
    with pytest.raises(ValueError, match="already compressed by moe-compress"):
        compress_checkpoint(tmp_path / "compressed", tmp_path / "out", CONFIG)
    assert not (tmp_path / "out").exists() and not work_dir(tmp_path / "out").exists()


MEASURE = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    import moe_compress as mc
    from moe_compress import compress_checkpoint

    def peak_mib():  # VmHWM, unlike ru_maxrss, starts afresh in an exec'd process
        return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))

    imported = peak_mib()
    config = mc.CompressionConfig(rank=1, method="delta", als_iters=1)
    compress_checkpoint(sys.argv[1], sys.argv[2], config, progress=False, max_shard_size="20MB")
    print(imported, peak_mib())
""")


@pytest.mark.slow
def test_peak_memory_stays_under_a_budget_far_below_the_experts_size(tmp_path):
    """64 layers of 12 MiB of experts: 768 MiB. The run may use a quarter of that above what its imports take, which
    a run that held the experts, or kept a layer's worth per layer, would exceed."""
    config = tiny_config("qwen3_moe", num_hidden_layers=64, hidden_size=1024, moe_intermediate_size=32,
                         num_experts=32, num_local_experts=32)
    config.head_dim = 8  # small attention: the experts are most of the checkpoint, as in real MoEs
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05, generator=generator)  # far faster than the default init, the same to the run
    model.save_pretrained(tmp_path / "big", max_shard_size="200MB")
    expert_mib = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n) / 2**20
    del model
    result = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "big"), str(tmp_path / "sc")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    imported, peak = map(float, result.stdout.split())
    assert expert_mib == 768
    assert peak - imported < expert_mib / 4, f"peak {peak:.0f} MiB: {peak - imported:.0f} above the imports' {imported:.0f}"
