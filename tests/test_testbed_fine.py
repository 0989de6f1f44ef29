"""The fine-grained testbed: loads offline, is a from-scratch 32-expert top-4 Qwen3-MoE whose figures match its card,
and the script that made it runs."""

import json
import math

import pytest
import torch
from transformers import Qwen3MoeForCausalLM

from moe_compress.testbed import FINE_TESTBED_DIR, heldout_loss, load_testbed, read_split
from moe_compress.testbed.train import expert_distance, expert_load
from moe_compress.testbed.train_fine import TEST_WINDOWS, main

SEQ_LEN = 256


@pytest.fixture(scope="module")
def fine():
    return load_testbed(path=FINE_TESTBED_DIR)


@pytest.fixture(scope="module")
def stats():
    return json.loads((FINE_TESTBED_DIR / "training_stats.json").read_text())


def test_shipped_model_is_a_byte_level_32_expert_top4_qwen3_moe(fine):
    model, tokenizer = fine
    config = model.config
    assert isinstance(model, Qwen3MoeForCausalLM)
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (32, 4, 64)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (128, 4, 256)
    assert config.norm_topk_prob and config.mlp_only_layers == [] and not config.output_router_logits
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (32, 2 * 64, 128)
    assert len(tokenizer) == 256 and tokenizer.eos_token_id == tokenizer.pad_token_id == 0


def test_experts_trained_from_scratch_differ_far_more_than_upcycled_ones(fine):
    # ||W_e - W_mean|| / ||W_e||: sqrt(1 - 1/32) = 0.98 for independent random experts, 0 for copies
    fine_distance, upcycled_distance = expert_distance(fine[0]), expert_distance(load_testbed()[0])
    assert min(fine_distance) > 0.8 and max(upcycled_distance) < 0.3  # measured: >= 0.98 and <= 0.24


def test_heldout_loss_is_the_one_on_the_card(fine, stats):
    recorded = stats["heldout_nats_per_byte"]
    loss = heldout_loss(fine[0], read_split("validation"), SEQ_LEN, max_tokens=TEST_WINDOWS * SEQ_LEN + 1)
    assert loss == pytest.approx(recorded[f"first_{TEST_WINDOWS}_windows"], abs=1e-3)
    assert recorded["validation"] < 2.0 < math.log(256)  # trained: a uniform guess scores ln 256 = 5.55
    card = (FINE_TESTBED_DIR / "README.md").read_text()
    assert f"{recorded['validation']:.4f}" in card and "from scratch, not upcycled" in card.lower()


def test_every_expert_of_every_layer_receives_tokens(fine, stats):
    fair = 1 / 32
    loads = expert_load(fine[0], read_split("validation"), SEQ_LEN, max_windows=16)
    assert min(map(min, loads)) > fair / 4  # measured: >= 0.70 of the fair share on these 16 windows
    assert min(map(min, stats["expert_load"])) > fair / 4  # the whole validation split, as on the card: >= 0.78


def test_training_script_makes_a_loadable_model_from_scratch(tmp_path):
    settings = ["--steps", "3", "--batch-size", "2", "--eval-bytes", "1024"]
    main(["--out", str(tmp_path), *settings, "--threads", str(torch.get_num_threads())])  # keeps this process's threads
    model, tokenizer = load_testbed(path=tmp_path)
    assert isinstance(model, Qwen3MoeForCausalLM) and model.config.num_experts == 32 and len(tokenizer) == 256
    stats = json.loads((tmp_path / "training_stats.json").read_text())
    assert stats["settings"]["steps"] == 3 and math.isfinite(stats["heldout_nats_per_byte"]["validation"])
    assert min(stats["expert_distance"]) > 0.9  # 3 steps leave the random experts independent
    assert (tmp_path / "README.md").read_text().startswith("# moe-compress testbed_fine")
