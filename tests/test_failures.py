"""Failures a long run meets for real: a full disk (a tiny tmpfs in a mount namespace of its own where the platform
allows, else a file size limit), a second run on the same output folder, two identical commands at once. Each ends
in one line that names the cause and the fix, and nothing finished is lost."""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_model

import moe_compress as mc
from moe_compress.compression.from_folder import lock_path

CLI = [sys.executable, "-m", "moe_compress", "compress", "compression.target_ratio=null", "compression.rank=2"]
CONFIG = mc.CompressionConfig(rank=2)  # what CLI compresses with


@pytest.fixture
def model_dir(tmp_path) -> Path:
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def can_mount_tmpfs() -> bool:
    """Whether this process may make a mount namespace of its own with a tmpfs in it (unshare -rm)."""
    probe = "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=64k tmpfs /tmp"
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_full_disk_ends_in_one_line_keeps_the_finished_units_and_the_rerun_resumes_to_the_same_folder(
        tmp_path, model_dir):
    clean = mc.compress_checkpoint(model_dir, tmp_path / "clean", CONFIG, progress=False)
    disk, result, api = tmp_path / "disk", tmp_path / "result", tmp_path / "api.py"
    disk.mkdir()
    api.write_text(textwrap.dedent(f"""
        import moe_compress as mc
        try:
            mc.compress_checkpoint({str(model_dir)!r}, {str(disk / 'out')!r}, mc.CompressionConfig(rank=2),
                                   progress=False)
        except mc.NoSpaceError as error:
            print("NoSpaceError:", error)
    """))
    if can_mount_tmpfs():  # a real full disk: room for the units, not for the assembled folder
        script = f"""
            mount -t tmpfs -o size=160k tmpfs {disk}
            {" ".join(CLI)} model={model_dir} output_dir={disk}/out > {tmp_path}/first.log 2>&1
            {sys.executable} {api} > {tmp_path}/api.log 2>&1
            ls -A {disk} > {tmp_path}/listing.log
            mount -o remount,size=8m tmpfs {disk}
            {" ".join(CLI)} model={model_dir} output_dir={disk}/out > {tmp_path}/rerun.log 2>&1
            cp -r {disk}/out {result}
        """
        subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=tmp_path, check=True, timeout=240)
        cause = "no space left on the device"
    else:  # a file size limit (RLIMIT_FSIZE) below the assembled weights' size, above every unit's
        limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
        for name, command in (("first", [*CLI, f"model={model_dir}", f"output_dir={disk / 'out'}"]),
                              ("api", [sys.executable, str(api)])):
            with open(tmp_path / f"{name}.log", "w") as log:
                subprocess.run(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit,
                               timeout=240)
        (tmp_path / "listing.log").write_text("\n".join(p.name for p in disk.iterdir()))
        with open(tmp_path / "rerun.log", "w") as log:
            subprocess.run([*CLI, f"model={model_dir}", f"output_dir={disk / 'out'}"], cwd=tmp_path, stdout=log,
                           stderr=subprocess.STDOUT, timeout=240)
        shutil.copytree(disk / "out", result)
        cause = "a file grew past this process's file size limit (ulimit -f)"
    first, api_out = (tmp_path / "first.log").read_text(), (tmp_path / "api.log").read_text()
    assert "Traceback" not in first, first[-3000:]
    line = last_line(first)
    assert line.startswith(f"moe-compress: error: {cause} writing {disk / 'out'}: about "), line
    assert "then rerun: the 6 finished (layer, projection) units in" in line and "are kept" in line, line
    assert (" more are needed (" in line) or (" are still to be written (" in line), line
    assert last_line(api_out).startswith(f"NoSpaceError: {cause} writing"), api_out[-2000:]
    # nothing half-written looks complete: no output folder, the work folder with its units, no partial files
    assert (tmp_path / "listing.log").read_text().split() == [".out.moe-compress-work"]
    rerun = (tmp_path / "rerun.log").read_text()
    assert "resuming: 6 of 6 (layer, projection) units are done and verified" in rerun, rerun[-2000:]
    assert (result / "model.safetensors").read_bytes() == (tmp_path / "clean" / "model.safetensors").read_bytes()
    assert [r.rank for r in clean.rows] == [2] * 6


@pytest.mark.slow
def test_save_compressed_on_a_full_disk_writes_nothing_and_says_so_in_one_line(tmp_path):
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import tiny_model
        import moe_compress as mc
        model = tiny_model("qwen3_moe")
        mc.compress(model, mc.CompressionConfig(rank=2), progress=False)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # below the weights' file
        try:
            mc.save_compressed(model, {str(tmp_path / 'out')!r})
        except mc.NoSpaceError as error:
            print(error)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout, out.stderr[-3000:]
    line = last_line(out.stdout)
    assert line.startswith(f"a file grew past this process's file size limit (ulimit -f) writing {tmp_path / 'out'}")
    assert line.endswith(f"raise the limit, then rerun: nothing was written to {tmp_path / 'out'}"), line
    assert list(tmp_path.iterdir()) == []  # no folder, no staging left behind


@pytest.mark.slow
def test_a_second_run_on_the_same_output_folder_is_refused_in_one_line_naming_the_first(tmp_path, model_dir):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from moe_compress.compression.from_folder import exclusive
        from moe_compress.parallel import Ranks
        with exclusive(Path({str(tmp_path / 'out')!r}), Ranks()):
            print("holding", flush=True)
            sys.stdin.readline()  # until the test lets go
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(FileExistsError, match=rf"{tmp_path / 'out'} is being written by another moe-compress run "
                                                  rf"\(process {holder.pid} on .*\); wait for it to end") as error:
            mc.compress_checkpoint(model_dir, tmp_path / "out", CONFIG, progress=False)
        assert "\n" not in str(error.value) and not (tmp_path / "out").exists()
    finally:
        holder.communicate("\n", timeout=60)
    assert not lock_path(tmp_path / "out").exists()  # the holder's lock went with it
    mc.compress_checkpoint(model_dir, tmp_path / "out", CONFIG, progress=False)  # now free
    assert mc.load_compressed(tmp_path / "out") is not None


@pytest.mark.slow
def test_two_identical_commands_at_once_end_cleanly(tmp_path, model_dir):
    command = [*CLI, f"model={model_dir}", f"output_dir={tmp_path / 'out'}"]
    runs = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(run.wait(timeout=240), *run.communicate()) for run in runs]
    assert any(code == 0 for code, _, _ in results)
    for code, _, err in results:
        assert "Traceback" not in err, err[-3000:]
        if code != 0:  # the one that found the other at work
            assert last_line(err).startswith(f"moe-compress: error: {tmp_path / 'out'} is being written by another")
    clean = mc.compress_checkpoint(model_dir, tmp_path / "clean", CONFIG, progress=False)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "clean" / "model.safetensors").read_bytes()
    assert clean.rows and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
