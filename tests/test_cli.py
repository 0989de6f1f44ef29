"""The `moe-compress` command, run as a real process."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from conftest import token_ids, tiny_model

import moe_compress as mc
from moe_compress.cli import main
from moe_compress.distill import select_trainable
from moe_compress.testbed import TESTBED_DIR


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_compress", *args], capture_output=True, text=True, cwd=cwd)


def cli_here(*args: str, cwd, monkeypatch, capsys) -> tuple[int, str, str]:
    """The command run in this process (what `moe-compress` runs, without the seconds a process takes to import
    torch and transformers): (exit code, stdout, the line it exits with or stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() sets it for Hydra
    try:
        main(list(args))
        code, message = 0, None
    except SystemExit as exit:
        code, message = (1, exit.code) if isinstance(exit.code, str) else (exit.code or 0, None)
    out, err = capsys.readouterr()
    return code, out, message if message is not None else err


@pytest.fixture
def model_dir(tmp_path):
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.slow
def test_compress_writes_a_folder_that_reloads_to_the_library_result(tmp_path, model_dir):
    out = tmp_path / "sc"
    result = cli("compress", f"model={model_dir}", "compression.rank=2", "compression.target_ratio=null",
                 f"output_dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "total:" in result.stdout and (out / "compression_report.json").exists()
    model = tiny_model("qwen3_moe")
    mc.compress(model, mc.CompressionConfig(rank=2), progress=False)
    with torch.no_grad():
        assert torch.allclose(mc.load_compressed(out)(token_ids()).logits, model(token_ids()).logits, atol=1e-5)


@pytest.mark.parametrize("args,message", [
    (["model=/nonexistent/model", "output_dir=x"], "no model folder at /nonexistent/model"),
    (["compression.rank=50", "compression.target_ratio=null"], "rank 50 stores more than the original"),
    (["compression.method=svd"], "method='svd' is unknown"),
    (["compression.reconstruction.steps=-1"], "reconstruction steps=-1 is not a step count"),
    (["compression.reconstruction.steps=5"], "give calibration data"),
])
def test_bad_input_is_one_line(tmp_path, model_dir, args, message, monkeypatch, capsys):
    code, _, line = cli_here("compress", f"model={model_dir}", f"output_dir={tmp_path / 'out'}", *args, cwd=tmp_path,
                             monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and "\n" not in line
    assert line.startswith("moe-compress: error: ") and message in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_input_ends_the_process_with_that_line_and_no_traceback(tmp_path, model_dir):
    result = cli("compress", f"model={model_dir}", f"output_dir={tmp_path / 'out'}", "compression.method=svd",
                 cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("moe-compress: error: method='svd' is unknown")


def test_help_lists_stages_and_cfg_prints_the_resolved_config(tmp_path, monkeypatch, capsys):
    here = lambda *args: cli_here(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    code, out, _ = here("--help")
    assert code == 0 and "compress" in out and "usage: moe-compress" in out
    code, out, _ = here("compress", "model=m", "output_dir=o", "compression.rank=8", "compression.target_ratio=null",
                        "--cfg", "job")
    assert code == 0 and "rank: 8" in out and "method: auto" in out
    assert "rank_allocation: null" in out and "num_cores: 1" in out
    assert "reconstruction:\n    steps: null" in out and "router: false" in out
    code, _, line = here("frobnicate")
    assert code == 1 and line.startswith("moe-compress: error: unknown stage 'frobnicate'")


@pytest.mark.slow
def test_distill_trains_a_compressed_folder_and_writes_checkpoints(tmp_path):
    student = tmp_path / "student"
    result = cli("compress", "compression.target_ratio=0.3", "compression.polish_steps=5", f"output_dir={student}",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "run"
    result = cli("distill", f"student={student}", f"output_dir={run}", "data.seq_len=64", "training.max_steps=4",
                 "training.per_device_train_batch_size=2", "training.save_steps=2", "training.eval_steps=4",
                 "training.per_device_eval_batch_size=64", "distill.alpha=0.7", "training.report_to=wandb",
                 "training.logging_steps=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    trainable, total = select_trainable(mc.load_compressed(student), "wrappers+cores", train_routers=False)
    assert f"training {trainable:,} of {total:,} student parameters" in result.stdout
    # wandb ran offline (no account, no network); its run log holds the separately logged loss terms
    (log,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert all(key in log.read_bytes() for key in (b"train/kl", b"train/ce", b"train/loss"))
    assert (run / "training_complete.json").exists() and (run / "hydra" / ".hydra" / "config.yaml").exists()
    # dtype=auto on the CPU trains in float32 (the folders are bf16): the checkpoint holds what was trained
    with safe_open(run / "checkpoint-4" / "model.safetensors", "pt") as stored:
        dtypes = {stored.get_slice(key).get_dtype() for key in stored.keys()}
    assert "F32" in dtypes and not dtypes & {"BF16", "F16"}
    trained = mc.load_compressed(run / "checkpoint-4", dtype=torch.float32)
    initial = mc.load_compressed(student, dtype=torch.float32)
    # every W_e rebuilt in fp32, run by transformers' own code
    mc.export_dense(run / "checkpoint-4", tmp_path / "dense", dtype="float32")
    ids = token_ids(1, 8) % 256
    with torch.no_grad():  # the checkpoint holds trained weights, and its logits are what they compute
        logits = trained(ids).logits
        assert not torch.allclose(logits, initial(ids).logits, atol=1e-3)
        assert torch.allclose(mc.load_model(str(tmp_path / "dense"), dtype=torch.float32)(ids).logits, logits,
                              atol=1e-4)


def test_distill_refuses_a_student_that_is_not_compressed(tmp_path, model_dir, monkeypatch, capsys):
    code, _, line = cli_here("distill", f"student={model_dir}", f"output_dir={tmp_path / 'run'}", cwd=tmp_path,
                             monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and "moe-compress did not compress" in line


@pytest.fixture
def compressed_testbed(tmp_path):
    """What `moe-compress compress compression.target_ratio=0.3 compression.polish_steps=0` writes (the command's
    compression is the library's, tested above)."""
    mc.compress_checkpoint(TESTBED_DIR, tmp_path / "sc", mc.CompressionConfig(target_ratio=0.3, polish_steps=0),
                           progress=False)
    return tmp_path / "sc"


def test_distill_names_the_missing_tokenizer_and_refuses_another_vocabulary_before_any_work(
        tmp_path, compressed_testbed, monkeypatch, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (compressed_testbed / name).unlink()
    run = tmp_path / "run"
    here = lambda *args: cli_here(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    code, _, last = here("distill", f"student={compressed_testbed}", f"output_dir={run}")
    assert code == 1 and last == (
        f"moe-compress: error: {compressed_testbed} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
        "tokenizer.model, ...); pass tokenizer=<a folder or hub id>, e.g. tokenizer=testbed (the teacher's: its "
        "vocabulary matches the student's)")
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "other")  # a vocabulary of 128 bytes, not 256
    code, _, last = here("distill", f"student={compressed_testbed}", f"teacher={tmp_path / 'other'}",
                         "tokenizer=testbed", f"output_dir={run}")
    assert code == 1 and last == (
        "moe-compress: error: teacher vocabulary (128) differs from the student's (256); use the teacher the student "
        "was compressed from")
    assert [p.name for p in run.iterdir()] == ["hydra"]  # Hydra's record of the command, and nothing else


def test_export_writes_a_dense_folder_and_says_it_gives_the_memory_back(tmp_path, compressed_testbed, monkeypatch,
                                                                       capsys):
    code, out, _ = cli_here("export", f"model={compressed_testbed}", f"output_dir={tmp_path / 'dense'}", cwd=tmp_path,
                            monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "gives back the memory saving" in out and "MiB compressed" in out
    assert load_file(tmp_path / "dense" / "model.safetensors")["model.layers.0.mlp.experts.down_proj"].shape == (
        8, 128, 256)
    code, _, line = cli_here("export", f"output_dir={tmp_path / 'dense'}", cwd=tmp_path, monkeypatch=monkeypatch,
                             capsys=capsys)
    assert code == 1 and "give model=<compressed folder>" in line


def test_eval_scores_a_model_and_names_close_matches_for_unknown_tasks(tmp_path, monkeypatch, capsys):
    code, out, _ = cli_here("eval", "model=testbed", "limit=2", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "bits_per_byte" in out and "acc_norm" in out
    code, _, last = cli_here("eval", "model=testbed", "tasks=[tinyshakespear]", cwd=tmp_path, monkeypatch=monkeypatch,
                             capsys=capsys)
    assert code == 1 and "unknown lm-eval task 'tinyshakespear'" in last and "tinyshakespeare" in last


@pytest.mark.slow
def test_torchrun_two_processes_write_the_same_folder_as_one(tmp_path, model_dir):
    args = ["compress", f"model={model_dir}", "compression.rank=2", "compression.target_ratio=null"]
    single = cli(*args, f"output_dir={tmp_path / 'one'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "moe_compress",
                          *args, f"output_dir={tmp_path / 'two'}"], cwd=tmp_path, capture_output=True, text=True,
                         env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("compressed model written to") == 1
    one, other = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)
