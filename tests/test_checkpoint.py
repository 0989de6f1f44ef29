"""save_compressed / load_compressed: a Hugging Face folder that reloads, in a fresh process, to the same model."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import token_ids, tiny_model
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import moe_compress as mc


def compressed(model_type="qwen3_moe", rank=2, seed=0):
    model = tiny_model(model_type, seed=seed)
    report = mc.compress(model, mc.CompressionConfig(rank=rank, polish_steps=5), progress=False)
    return model, report


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(128)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w1", pad_token="w0")


def run_fresh(script: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_reload_in_a_fresh_process_gives_identical_logits_and_generation(tmp_path, model_type):
    model, report = compressed(model_type)
    folder = mc.save_compressed(model, tmp_path / "sc", tokenizer=word_tokenizer(), report=report)
    ids = token_ids(1, 6)
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    run_fresh(f"""
        import torch, moe_compress
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        ids = torch.tensor({ids.tolist()})
        for name, model in [("load", moe_compress.load_compressed("{folder}")),
                            ("auto", AutoModelForCausalLM.from_pretrained("{folder}"))]:
            assert isinstance(model.get_submodule("model.layers.0.mlp.experts"), moe_compress.SharedCoreExperts)
            with torch.no_grad():
                save_file({{"logits": model(ids).logits,
                           "generated": model.generate(ids, max_new_tokens=8, do_sample=False)}},
                          f"{tmp_path}/{{name}}.safetensors")
    """)
    for name in ("load", "auto"):
        fresh = load_file(tmp_path / f"{name}.safetensors")
        assert torch.equal(fresh["logits"], logits)
        assert torch.equal(fresh["generated"], generated)


def test_folder_contents(tmp_path):
    model, report = compressed()
    folder = mc.save_compressed(model, tmp_path / "sc", tokenizer=word_tokenizer(), report=report)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md",
            "compression_report.json", "tokenizer.json"} <= names
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "moe_compress"
    assert quant["modules"]["model.layers.0.mlp.experts"]["ranks"] == {"gate": 2, "up": 2, "down": 2}
    assert quant["compression"]["rank"] == 2 and quant["stats"]["params_after"] == report.params_after
    card = (folder / "README.md").read_text()
    assert f"{report.params_before:,} -> {report.params_after:,}" in card
    assert json.loads((folder / "compression_report.json").read_text())["rows"][0]["rank"] == 2
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left behind


def test_the_model_card_names_the_form_of_every_projection(tmp_path):
    model = tiny_model()
    report = mc.compress(model, mc.CompressionConfig(rank=2, method="mixed"), progress=False)
    card = (mc.save_compressed(model, tmp_path / "sc", report=report) / "README.md").read_text()
    assert "an input basis the experts share for gate and up (W_e ~ C + U_e V^T) and a per-expert low-rank term for " \
        "down" in card.replace("\n", " ")


def test_sharded_save_reloads(tmp_path):
    model, _ = compressed()
    folder = mc.save_compressed(model, tmp_path / "sc", max_shard_size="20KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert torch.equal(mc.load_compressed(folder)(token_ids()).logits, model(token_ids()).logits)


def test_output_folder_holding_another_model_is_refused(tmp_path):
    target = tmp_path / "sc"
    first, _ = compressed(rank=2)
    mc.save_compressed(first, target)
    mc.save_compressed(first, target)  # the same compression again replaces it
    other, _ = compressed(rank=1)
    with pytest.raises(FileExistsError, match="already holds a different model .* pass overwrite=True"):
        mc.save_compressed(other, target)
    assert json.loads((target / "config.json").read_text())["quantization_config"]["compression"]["rank"] == 2
    mc.save_compressed(other, target, overwrite=True)
    assert json.loads((target / "config.json").read_text())["quantization_config"]["compression"]["rank"] == 1


def test_a_crash_while_saving_leaves_nothing(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    model, _ = compressed()
    with pytest.raises(RuntimeError, match="disk full"):
        mc.save_compressed(model, tmp_path / "sc", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="not compressed by moe-compress; call moe_compress.compress"):
        mc.save_compressed(tiny_model(), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no model folder at /nonexistent/model"):
        mc.load_compressed("/nonexistent/model")
    tiny_model().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="moe-compress did not compress"):
        mc.load_compressed(tmp_path / "plain")
