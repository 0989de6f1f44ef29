"""A compressed folder used elsewhere: plain transformers and the lm-eval CLI in processes that never import
moe_compress (the start-up hook registers it), a process where moe_compress cannot be imported (a one-line error,
never random experts), and the dense export, loaded by stock transformers alone."""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import token_ids, tiny_model
from safetensors.torch import load_file

import moe_compress as mc
from moe_compress.evaluate import EvalConfig, evaluate_model
from moe_compress.folder.marking import MODEL_TYPE, SHIM
from moe_compress.tasks import TASKS_DIR
from moe_compress.testbed import TESTBED_DIR

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# A process without the package: no site processing (so neither the start-up hook nor the editable install's path
# runs), the environment's packages put back on the path, and moe_compress blocked should it be installed there
WITHOUT_PACKAGE = f"""
import sys
sys.path.append({sysconfig.get_path("purelib")!r})
sys.modules["moe_compress"] = None
"""


def python(code: str, *flags: str) -> str:
    result = subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=ENV, stdin=subprocess.DEVNULL, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def without_package(code: str) -> str:
    return python(WITHOUT_PACKAGE + textwrap.dedent(code), "-S")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The bundled testbed, compressed as `moe-compress compress` does it."""
    out = tmp_path_factory.mktemp("loading") / "sc"
    mc.compress_checkpoint(TESTBED_DIR, out, mc.CompressionConfig(target_ratio=0.3, polish_steps=0), progress=False)
    return out


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.slow
def test_the_hook_is_installed_and_costs_no_torch_import_at_start_up():
    out = python("import sys; print('moe_compress.autoload' in sys.modules, 'torch' in sys.modules, "
                 "'transformers' in sys.modules)")
    assert out.split() == ["True", "False", "False"]


@pytest.mark.slow
def test_plain_from_pretrained_in_a_process_that_never_imports_us_equals_load_compressed(folder, tmp_path):
    ids = token_ids(2, 16)
    expected = logits_of(mc.load_compressed(folder), ids)
    out = python(f"""
        import sys, torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("{folder}")
        print(type(model.model.layers[0].mlp.experts).__name__, model.config.model_type)
        with torch.no_grad():
            save_file({{"logits": model(torch.tensor({ids.tolist()})).logits.float()}}, "{tmp_path}/plain.safetensors")
    """)
    assert out.split() == ["SharedCoreExperts", "qwen3_moe"]
    assert torch.equal(load_file(tmp_path / "plain.safetensors")["logits"], expected)


@pytest.mark.slow
def test_the_lm_eval_cli_scores_a_compressed_folder_as_moe_compress_eval_does(folder, tmp_path):
    config = EvalConfig(tasks=["tinyshakespeare"], limit=4, device="cpu", batch_size=4)
    ours = evaluate_model(folder, config)["tinyshakespeare"]
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder}", "--tasks",
         "tinyshakespeare", "--include_path", str(TASKS_DIR), "--limit", "4", "--batch_size", "4", "--device", "cpu",
         "--output_path", str(tmp_path / "lm_eval")], capture_output=True, text=True, env=ENV, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = (tmp_path / "lm_eval").rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]["tinyshakespeare"]
    for metric in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        assert theirs[f"{metric},none"] == pytest.approx(ours[metric], rel=1e-6)


@pytest.mark.slow
def test_without_the_package_loading_fails_in_one_line_and_never_returns_random_experts(folder):
    out = without_package(f"""
        from transformers import AutoModelForCausalLM
        for trust in (False, True):
            try:
                AutoModelForCausalLM.from_pretrained("{folder}", trust_remote_code=trust)
                print("LOADED")
            except Exception as error:
                print(type(error).__name__, "|", str(error).replace("\\n", " / "))
    """)
    plain, trusted = out.strip().splitlines()
    assert "LOADED" not in out
    assert plain.startswith("ValueError |") and "trust_remote_code=True" in plain  # transformers' own refusal
    assert trusted == ("ImportError | this model was compressed by moe-compress, which is not installed here; run "
                       "`pip install moe-compress`, or load its dense export (`moe-compress export`)")


def test_a_loaded_folder_saved_again_stays_protected(folder, tmp_path):
    mc.load_compressed(folder).save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (config["model_type"], config["base_model_type"]) == (MODEL_TYPE, "qwen3_moe")
    assert config["auto_map"]["AutoConfig"].startswith(SHIM) and (tmp_path / "again" / f"{SHIM}.py").exists()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])  # gpt_oss: biases, transposed, interleaved gate/up
def test_dense_export_loads_in_stock_transformers_with_the_compressed_logits(tmp_path, model_type):
    model = tiny_model(model_type)
    mc.compress(model, mc.CompressionConfig(rank=2, polish_steps=5), progress=False)
    mc.save_compressed(model, tmp_path / "sc")
    ids = token_ids(2, 12)
    expected = logits_of(mc.load_compressed(tmp_path / "sc"), ids)
    mc.export_dense(tmp_path / "sc", tmp_path / "dense")
    out = without_package(f"""
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("{tmp_path / 'dense'}")
        experts = model.model.layers[0].mlp.experts
        print(type(experts).__module__.split(".")[0], model.config.model_type,
              getattr(model.config, "quantization_config", None))
        with torch.no_grad():
            save_file({{"logits": model(torch.tensor({ids.tolist()})).logits.float()}}, "{tmp_path}/dense.safetensors")
    """)
    assert out.split() == ["transformers", model_type, "None"]
    assert torch.allclose(load_file(tmp_path / "dense.safetensors")["logits"], expected, atol=1e-5, rtol=1e-5)


def test_dense_export_refuses_what_it_cannot_export(tmp_path, folder):
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="did not compress"):
        mc.export_dense(tmp_path / "plain", tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is not empty; pass overwrite=True"):
        mc.export_dense(folder, tmp_path / "busy")
    assert (tmp_path / "busy" / "file").read_text() == "x"
