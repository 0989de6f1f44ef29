"""torchrun's work split, the manifest and the work folder: real gloo processes, real files."""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moe_compress as mc
from moe_compress.calibration.sensitivity import token_sensitivity
from moe_compress.calibration.store import load_sensitivity, load_statistics
from moe_compress.parallel import Manifest, Ranks, open_work_dir, share, write_atomically
from moe_compress import compress_checkpoint

CONFIG = {"rank": 2, "polish_steps": 20, "calibration": {"batch_size": 2}}  # calibrated: 3 batches of the 6 sequences
CALIBRATION = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
RUN = textwrap.dedent(f"""
    import os, sys, torch
    torch.set_num_threads(1)
    import moe_compress as mc
    from moe_compress import compress_checkpoint
    CONFIG = {CONFIG!r}
    ids = torch.load(sys.argv[3]) if len(sys.argv) > 3 else None  # calibration token ids
    report = compress_checkpoint(sys.argv[1], sys.argv[2], mc.CompressionConfig(**CONFIG), calibration=ids)
    print(f"rank {{os.environ.get('RANK', 0)}} of {{os.environ.get('WORLD_SIZE', 1)}}: {{len(report.rows)}} rows")
""")


@pytest.mark.slow
def test_two_gloo_processes_write_the_folder_one_process_writes(tmp_path):
    tiny_model("qwen3_moe", num_hidden_layers=3).save_pretrained(tmp_path / "src")
    script = tmp_path / "run.py"
    script.write_text(RUN)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script),
                             str(tmp_path / "src"), str(tmp_path / "two")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 2: 9 rows" in result.stdout and "rank 1 of 2: 9 rows" in result.stdout
    # 9 (layer, projection) units: rank 0 fits the first 4, rank 1 the other 5
    assert re.search(r"compress \[rank 0/2\]: 100%\|[^|]*\| 4/4 ", result.stderr)
    assert re.search(r"compress \[rank 1/2\]: 100%\|[^|]*\| 5/5 ", result.stderr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each torchrun process: the fits are bit-identical at equal thread counts
    try:
        report = compress_checkpoint(tmp_path / "src", tmp_path / "one", mc.CompressionConfig(rank=2, polish_steps=20),
                                     progress=False)
    finally:
        torch.set_num_threads(threads)
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    rows = json.loads((tmp_path / "two" / "compression_report.json").read_text())["rows"]
    assert [r["rel_error"] for r in rows] == [r.rel_error for r in report.rows]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "run.py", "src", "two"]


@pytest.mark.slow
def test_two_gloo_processes_calibrate_on_their_shares_of_the_batches_and_write_the_folder_one_process_writes(
        tmp_path):
    tiny_model("qwen3_moe", num_hidden_layers=2).save_pretrained(tmp_path / "src")
    script = tmp_path / "run.py"
    script.write_text(RUN)
    torch.save(CALIBRATION, tmp_path / "ids.pt")
    stderr = {}
    for out, launcher in (("two", ["-m", "torch.distributed.run", "--nproc-per-node", "2"]), ("one", [])):
        result = subprocess.run([sys.executable, *launcher, str(script), str(tmp_path / "src"), str(tmp_path / out),
                                 str(tmp_path / "ids.pt")], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        stderr[out] = result.stderr
    for rank in (0, 1):  # 3 batches: rank 0 runs two of them through both layers, rank 1 the third
        assert re.search(rf"calibration \[rank {rank}/2\]: 100%\|[^|]*\| 2/2 ", stderr["two"])
        # the reconstruction's tokens are rank 0's two batches: each process weighs one (2 layers, there and back)
        assert re.search(rf"loss weights \[rank {rank}/2\]: 100%\|[^|]*\| 4/4 ", stderr["two"])
    assert "calibration:" not in stderr["one"]  # no bar: gathered once by the two processes, then reused
    (statistics,) = tmp_path.glob(".moe-compress-statistics-*")
    units = sorted(p.name for p in (statistics / "units").glob("*.safetensors"))
    assert units == [f"model.layers.{i}.mlp.experts{kind}.safetensors" for i in (0, 1) for kind in ("", ".sensitivity")]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    coverage = json.loads((tmp_path / "two" / "compression_report.json").read_text())["coverage"]
    assert all(sum(tokens) == 6 * 16 * 2 for tokens in coverage.values())
    compress_checkpoint(tmp_path / "src", tmp_path / "alone" / "out", mc.CompressionConfig(**CONFIG),
                        calibration=CALIBRATION, progress=False)  # one process gathering the statistics alone
    (alone,) = (tmp_path / "alone").glob(".moe-compress-statistics-*")
    for name in ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts"):
        summed, single = (load_statistics(Manifest(folder), name) for folder in (statistics, alone))
        assert torch.equal(summed.tokens, single.tokens)
        for a, b in ((summed.inputs, single.inputs), (summed.intermediate, single.intermediate)):
            scale = b.diagonal(dim1=1, dim2=2).amax(-1)[:, None, None]
            assert ((a - b).abs() <= 2**-7 * scale).all()  # fp32 sums in another order: one bf16 step apart at most
    # the two processes' token weights, each computing one batch, against one backward through the loaded model on
    # the reconstruction's tokens: the first process's share of the batches, the first and the third
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    names = [name for name, _ in mc.find_experts(model)]
    batches = CALIBRATION.split(CONFIG["calibration"]["batch_size"])
    want = token_sensitivity(model, [batches[0], batches[2]], {n: model.get_submodule(n.rpartition(".")[0])
                                                               for n in names}, tokens=2 * batches[0].numel())
    for name in names:
        torch.testing.assert_close(load_sensitivity(Manifest(statistics), name), want[name], rtol=1e-5, atol=1e-5)


def test_share_gives_each_rank_a_contiguous_block_and_every_unit_once():
    units = list(range(10))
    shares = [share(units, Ranks(rank, 3)) for rank in range(3)]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert share(units[:1], Ranks(1, 2)) == [0] and share(units[:1], Ranks(0, 2)) == []


def test_manifest_trusts_only_files_that_match_a_record(tmp_path):
    (tmp_path / "units").mkdir()
    manifest = Manifest(tmp_path, rank=1)
    manifest.save("a", {"w": torch.ones(3)}, {"rel_error": 0.5})
    manifest.save("b", {"w": torch.zeros(3)}, {"rel_error": 0.25})
    assert manifest.done(["a", "b", "c"]) == {"a": {"rel_error": 0.5}, "b": {"rel_error": 0.25}}
    assert torch.equal(load_file(manifest.path("a"))["w"], torch.ones(3))

    data = bytearray(manifest.path("a").read_bytes())
    data[-1] ^= 0xFF
    manifest.path("a").write_bytes(bytes(data))  # corrupted: refitted
    write_atomically(manifest.path("c"), manifest.path("b").read_bytes())  # a file without its record: refitted
    with open(manifest.own, "a") as f:
        f.write('{"unit": "d", "sha2')  # a record torn by a crash
    assert manifest.done(["a", "b", "c"]) == {"b": {"rel_error": 0.25}}

    Manifest(tmp_path, rank=0).save("a", {"w": torch.ones(3)}, {"rel_error": 0.5})  # another rank refits it
    manifest.save("d", {"w": torch.ones(2)}, {"rel_error": 0.125})  # the record after a torn one parses
    assert manifest.done(["a", "b", "d"]).keys() == {"a", "b", "d"}
    assert not list(tmp_path.glob("units/.*"))  # no temporary file left


def test_work_folder_is_reused_only_by_the_same_settings(tmp_path):
    work = tmp_path / "work"
    open_work_dir(work, {"rank": 2}, overwrite=False)
    (work / "units" / "finished.safetensors").write_bytes(b"x")
    open_work_dir(work, {"rank": 2}, overwrite=False)
    assert (work / "units" / "finished.safetensors").exists()
    with pytest.raises(FileExistsError, match=r"other settings \(rank: 2 then, 1 now\); rerun with the same"):
        open_work_dir(work, {"rank": 1}, overwrite=False)
    open_work_dir(work, {"rank": 1}, overwrite=True)
    assert not (work / "units" / "finished.safetensors").exists()
    assert json.loads((work / "settings.json").read_text()) == {"rank": 1}
