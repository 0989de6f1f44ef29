"""The bundled testbed: loads offline, is a trained byte-level Qwen3-MoE, and the script that made it runs."""

import json
import math

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from moe_compress.testbed import corpus_path, heldout_loss, load_testbed, read_split
from moe_compress.testbed.train import expert_load, main, upcycle

# The shipped MoE scores 1.30 nats per byte on the first 16 validation windows, 1.49 on the whole split
# (model/README.md); a uniform guess scores ln 256 = 5.55.
TRAINED_BOUND = 1.8


@pytest.fixture(scope="module")
def testbed():
    return load_testbed()


def test_shipped_model_is_a_byte_level_top2_qwen3_moe(testbed):
    model, tokenizer = testbed
    assert isinstance(model, Qwen3MoeForCausalLM)
    assert (model.config.num_experts, model.config.num_experts_per_tok, model.config.vocab_size) == (8, 2, 256)
    assert model.config.norm_topk_prob and model.config.mlp_only_layers == []
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 2 * 256, 128)
    assert len(tokenizer) == 256 and tokenizer.eos_token_id == tokenizer.pad_token_id == 0


def test_tokenizer_maps_each_byte_to_its_value_and_back(testbed):
    _, tokenizer = testbed
    text = "ROMEO: Ä ü — 日本語 🎭 Ā\x00\n\tend"  # "Ā" is ByteLevel's symbol for byte 0, the eos token
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_splits_partition_the_corpus_at_a_newline():
    train, validation = read_split("train"), read_split("validation")
    assert train + validation == corpus_path().read_text(encoding="utf-8")
    assert train.endswith("\n") and 0.09 < len(validation) / (len(train) + len(validation)) < 0.11
    with pytest.raises(ValueError, match="unknown split 'test'"):
        read_split("test")


def test_shipped_model_is_much_better_than_uniform(testbed):
    model, _ = testbed
    loss = heldout_loss(model, read_split("validation"), max_tokens=16 * 256 + 1)
    assert math.isfinite(loss) and loss < TRAINED_BOUND < math.log(256)


def test_every_shipped_expert_is_in_use(testbed):
    loads = expert_load(testbed[0], read_split("validation"), seq_len=256, max_windows=8)  # measured: >= 9% each
    assert all(min(shares) > 0.03 for shares in loads)


def test_heldout_loss_refuses_text_shorter_than_a_window(testbed):
    with pytest.raises(ValueError, match="fewer than seq_len"):
        heldout_loss(testbed[0], "too short")


def test_generate_continues_a_prompt(testbed):
    model, tokenizer = testbed
    prompt = tokenizer("ROMEO:\n", return_tensors="pt")
    ids = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    text = tokenizer.decode(ids[0])
    assert text.startswith("ROMEO:\n") and len(text) > len("ROMEO:\n") + 20


def test_upcycled_moe_computes_the_dense_model():
    torch.manual_seed(0)
    shape = dict(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16
    )
    dense = Qwen3ForCausalLM(Qwen3Config(**shape, intermediate_size=48)).eval()
    experts = dict(moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
    moe = upcycle(dense, Qwen3MoeConfig(**shape, **experts)).eval()
    ids = torch.randint(0, 256, (2, 24))
    torch.testing.assert_close(moe(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_training_script_makes_a_loadable_model(tmp_path):
    steps = ["--dense-steps", "3", "--moe-steps", "3", "--batch-size", "2", "--eval-bytes", "1024"]
    main(["--out", str(tmp_path), *steps, "--threads", str(torch.get_num_threads())])  # keeps this process's threads
    model, tokenizer = load_testbed(path=tmp_path)
    assert isinstance(model, Qwen3MoeForCausalLM) and len(tokenizer) == 256
    stats = json.loads((tmp_path / "training_stats.json").read_text())
    assert stats["settings"]["moe_steps"] == 3 and math.isfinite(stats["heldout_nats_per_byte"]["moe"])
    assert (tmp_path / "README.md").read_text().startswith("# moe-compress testbed")
