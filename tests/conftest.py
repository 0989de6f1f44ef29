"""What several test modules share (test modules never import each other): tiny random transformers models of many
MoE architectures, built offline from their configs; random compressed experts; synthetic experts and metrics; a
counter of the aten kernels that ran; the compressed testbed."""

from __future__ import annotations

import copy
import functools
import os
from collections import Counter, defaultdict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

import moe_compress as mc
from moe_compress import ModuleSpec, SharedCoreExperts
from moe_compress.discovery import projection_names
from moe_compress.experts import wrapped_weights
from moe_compress.testbed import load_testbed

# One torch thread per process, here and in every process a test starts (they inherit the environment): the suite runs
# on 2 cores, where tests that start two processes would otherwise run four threads, whatever the launching shell set
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

VOCAB = 128
SMALL = dict(
    hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, num_experts=4, num_local_experts=4, n_routed_experts=4,
    num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1, max_position_embeddings=128,
    decoder_sparse_step=1, mlp_only_layers=[], shared_expert_intermediate_size=32,
)
# Architectures that use transformers' experts interface, with what sets each apart.
ARCHITECTURES = {
    "qwen3_moe": {},
    "qwen2_moe": {},  # shared expert beside the routed ones
    "mixtral": {},
    "olmoe": {},
    "deepseek_v3": {"num_key_value_heads": 4},  # multi-head latent attention, shared experts
    "gpt_oss": {},  # biases, transposed weights, interleaved gate/up, its own clamped gating
    "glm4_moe": {},
    "phimoe": {},
    "granitemoe": {},
    "nemotron_h": {},  # no gate: up and down only, hybrid mamba layers
}


def tiny_config(model_type: str, **overrides):
    config = AutoConfig.for_model(model_type)
    for key, value in {**SMALL, **ARCHITECTURES.get(model_type, {}), **overrides}.items():
        if hasattr(config, key):
            setattr(config, key, value)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) > config.num_hidden_layers:
        config.layer_types = layer_types[: config.num_hidden_layers]  # the defaults describe the full-size model
    return config


def tiny_model(model_type: str = "qwen3_moe", seed: int = 0, **overrides) -> PreTrainedModel:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()


def token_ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def qwen3_moe() -> PreTrainedModel:
    return tiny_model("qwen3_moe")


def randomize(shared: SharedCoreExperts, seed: int = 0, num_cores: int = 1) -> SharedCoreExperts:
    """Random cores and factors, so that the experts are exactly of the stored form."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for proj in shared.projections.values():
            out_f, in_f = proj.shape
            proj.expert_core.copy_(torch.arange(proj.num_experts) % num_cores)
            for name, p in proj.named_parameters():
                scale = in_f**-0.5 if name == "core" else 0.3 / max(out_f, in_f) ** 0.5
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return shared


def shared_spec(experts, form="wrapped", rank=3, num_cores=1) -> ModuleSpec:
    return ModuleSpec(form, {p: rank for p in projection_names(experts)}, num_cores)


class KernelCalls(TorchDispatchMode):
    """Within the block, the aten kernels that ran (in a forward and a backward alike): how often each, and the shapes
    of its tensor arguments call by call."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()
        self.shapes = defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # counted after the call: a kernel that refuses its inputs (and whose caller falls back) has not run
        self.calls[func] += 1
        self.shapes[func].append([tuple(a.shape) for a in args if isinstance(a, torch.Tensor)])
        return out


def experts_like(E=6, out_f=24, in_f=40, rank=3, noise=0.3, seed=0) -> torch.Tensor:
    """A shared part, per-expert wrapper deviations, and unstructured noise: [E, out, in]."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)
    C = randn(1, out_f, in_f) / in_f**0.5
    W = wrapped_weights(C, 0.3 * randn(E, out_f, rank), 0.3 * randn(E, out_f, rank) / out_f**0.5,
                        0.3 * randn(E, in_f, rank), 0.3 * randn(E, in_f, rank) / in_f**0.5)
    return W + noise * randn(E, out_f, in_f) / in_f**0.5


def metrics_like(E=6, in_f=40, tokens=200, spread=2.0, seed=0, dtype=torch.float32) -> torch.Tensor:
    """Input Grams M_e = X_e^T X_e / tokens, damped, of tokens whose channel scales span 10^spread (shared outlier
    channels and per-expert ones, as in LLM activations): [E, in, in], SPD and strongly anisotropic."""
    g = torch.Generator().manual_seed(seed)
    scales = 10 ** (spread * (torch.rand(1, 1, in_f, generator=g) + 0.5 * torch.rand(E, 1, in_f, generator=g) - 0.75))
    X = (torch.randn(E, tokens, in_f, generator=g) * scales).to(dtype)
    M = X.mT @ X / tokens
    return M + 0.01 * M.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(in_f, dtype=dtype)


def calibration_ids(count=8, length=32, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


@functools.cache
def _compressed_testbed():
    model, tokenizer = load_testbed()
    mc.compress(model, mc.CompressionConfig(target_ratio=0.3, method="als", polish_steps=20), progress=False)
    return model, tokenizer


def compressed_testbed():
    """The testbed compressed by the wrapper's ALS to kept 0.3, and its tokenizer: a fresh copy of the model each call
    (tests train it), compressed once per test process (14 s each time, seven times over)."""
    model, tokenizer = _compressed_testbed()
    return copy.deepcopy(model), tokenizer
