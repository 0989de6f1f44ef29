"""Makes the testbed the way Mixtral and Qwen-MoE were made: train a dense model, upcycle it, train on.

    python -m moe_compress.testbed.train --out <dir>     # the defaults make the shipped model in testbed/model/

1. a byte-level tokenizer (token id = byte value, 256 ids, lossless);
2. a dense Qwen3 (4 layers, hidden 128, MLP width 256) trained on random 256-byte windows of the train split;
3. upcycling to a Qwen3-MoE: attention, norms and embeddings copied, the dense MLP copied into each of 8 experts,
   a small random router (top-2, renormalised), so the MoE starts out computing exactly the dense model;
4. training the MoE on, with a per-layer load-balancing loss, so different tokens reach different experts and they diverge;
5. held-out loss of both models on the validation split, then the MoE (bf16 safetensors), tokenizer, model card and
   training_stats.json are saved to --out.

Every random choice (init, router, windows, Trainer shuffling) is seeded by --seed; runs on one CPU thread by default.
"""

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch.utils.data import Dataset
from transformers import (
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Trainer,
    TrainingArguments,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from moe_compress.testbed import TESTBED_DIR, heldout_loss, load_testbed, read_split
from moe_compress.testbed.card import write_card

# Byte 0 (NUL) never occurs in text, so it serves as bos, eos and pad without taking a 257th id.
SPECIAL_BYTE = 0
ARCHITECTURE = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    tie_word_embeddings=True,
    bos_token_id=SPECIAL_BYTE,
    eos_token_id=SPECIAL_BYTE,
    pad_token_id=SPECIAL_BYTE,
)
MOE = dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
ROUTER_AUX_LOSS_COEF = 0.01


def testbed_parser(doc: str, out: Path) -> argparse.ArgumentParser:
    """The arguments every testbed script takes: where to save, batch shape, seed, threads and how much to score."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=out, help="folder for the MoE model (default: shipped)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--eval-bytes", type=int, default=None, help="score only this many validation bytes")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = testbed_parser(__doc__, TESTBED_DIR)
    parser.add_argument("--dense-steps", type=int, default=1200)
    parser.add_argument("--moe-steps", type=int, default=800)
    parser.add_argument("--dense-lr", type=float, default=3e-3)
    parser.add_argument("--moe-lr", type=float, default=1e-3)
    return parser.parse_args(argv)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Token id = byte value: BPE without merges over the 256 ByteLevel symbols, so encoding never loses a byte."""
    symbol = bytes_to_unicode()  # byte -> the printable character ByteLevel uses for it
    backend = Tokenizer(models.BPE(vocab={symbol[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    special = symbol[SPECIAL_BYTE]
    # split_special_tokens: the text "Ā" (ByteLevel's symbol for byte 0) must encode as its bytes, not as eos.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=special, eos_token=special, pad_token=special, split_special_tokens=True
    )


def encode_checked(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    ids = tokenizer(text)["input_ids"]
    if ids != list(text.encode("utf-8")) or tokenizer.decode(ids) != text:
        raise RuntimeError("byte tokenizer is not lossless on the corpus; tokenizers' ByteLevel mapping changed")
    return torch.tensor(ids)


class RandomWindows(Dataset):
    """`n` windows of `seq_len` + 1 bytes at seeded random offsets; labels = inputs (the model shifts them)."""

    def __init__(self, ids: torch.Tensor, seq_len: int, n: int, seed: int):
        self.ids, self.seq_len = ids, seq_len
        self.starts = torch.randint(0, len(ids) - seq_len, (n,), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.ids[self.starts[i] : self.starts[i] + self.seq_len + 1]
        return {"input_ids": window, "labels": window}


def loss_with_per_layer_balance(config: Qwen3MoeConfig) -> Callable[..., torch.Tensor]:
    """The Trainer loss for `config`'s MoE: next-byte loss + router_aux_loss_coef * the Switch load-balancing loss of
    each layer, averaged over layers.

    transformers' own aux loss pools the routing statistics of all layers, so layers may overload different experts
    and cancel out; a first run trained with it left 2-3 experts per layer with almost no tokens.
    """
    E, K = config.num_experts, config.num_experts_per_tok

    def loss(
        outputs: MoeCausalLMOutputWithPast, labels: torch.Tensor, num_items_in_batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        lm = ForCausalLMLoss(outputs.logits, labels, config.vocab_size, num_items_in_batch)
        balance = [load_balancing_loss_func((logits,), E, K) for logits in outputs.router_logits]  # [T, E] per layer
        return lm + config.router_aux_loss_coef * torch.stack(balance).mean()

    return loss


def fit(
    model: torch.nn.Module,
    windows: RandomWindows,
    lr: float,
    args: argparse.Namespace,
    loss_func: Callable[..., torch.Tensor] | None = None,
) -> None:
    """One pass over `windows` in batches: AdamW, warmup over 5% of the steps, cosine decay to 0, clipping at 1.

    `loss_func(outputs, labels, num_items_in_batch)` replaces the model's own loss where given.
    """
    steps = len(windows) // args.batch_size
    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, steps // 20),
            weight_decay=0.1,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            logging_steps=max(1, steps // 10),
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=args.seed,
            data_seed=args.seed,
            dataloader_pin_memory=False,  # windows are a few KB; pinning only warns on CPU
        )
        Trainer(model=model, args=training_args, train_dataset=windows, compute_loss_func=loss_func).train()


def upcycle(dense: Qwen3ForCausalLM, config: Qwen3MoeConfig) -> Qwen3MoeForCausalLM:
    """Every expert starts as the dense MLP; with renormalised top-k weights the MoE output equals the dense one.

    The router keeps its small random init (std = initializer_range): it only picks which identical experts see a
    token at first, and those different tokens are what make the experts diverge in training.
    """
    moe = Qwen3MoeForCausalLM(config)
    shared = {name: w for name, w in dense.state_dict().items() if ".mlp." not in name}
    missing, unexpected = moe.load_state_dict(shared, strict=False)
    if unexpected or any(".mlp." not in name for name in missing):
        raise RuntimeError(f"dense and MoE configs disagree outside the MLPs: {unexpected or missing}")
    with torch.no_grad():
        for dense_layer, moe_layer in zip(dense.model.layers, moe.model.layers):
            mlp, experts = dense_layer.mlp, moe_layer.mlp.experts
            # copy_ broadcasts the dense [2F, H] and [H, F] weights over the expert dimension E
            experts.gate_up_proj.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))  # [E, 2F, H], gate first
            experts.down_proj.copy_(mlp.down_proj.weight)  # [E, H, F]
    return moe


def flat_experts(moe: Qwen3MoeForCausalLM) -> list[torch.Tensor]:
    """Per layer, each expert's weights (gate, up and down) as one row: [E, P] with P = 3 F H."""
    experts = [layer.mlp.experts for layer in moe.model.layers]
    return [torch.cat([e.gate_up_proj.flatten(1), e.down_proj.flatten(1)], dim=1).detach().float() for e in experts]


def expert_spread(moe: Qwen3MoeForCausalLM) -> list[float]:
    """Per layer, mean_e ||W_e - W_mean|| / ||W_mean|| over each expert's weights: 0 right after upcycling."""
    return [((W - W.mean(dim=0)).norm(dim=1).mean() / W.mean(dim=0).norm()).item() for W in flat_experts(moe)]


def expert_distance(moe: Qwen3MoeForCausalLM) -> list[float]:
    """Per layer, mean_e ||W_e - W_mean|| / ||W_e||: the part of each expert not common to all, 0 for copies.

    E independent random experts score about sqrt(1 - 1/E), just under 1.
    """
    return [((W - W.mean(dim=0)).norm(dim=1) / W.norm(dim=1)).mean().item() for W in flat_experts(moe)]


@torch.inference_mode()
def expert_load(
    moe: Qwen3MoeForCausalLM, text: str, seq_len: int, max_windows: int | None = 32, batch_size: int = 16
) -> list[list[float]]:
    """Per layer, the share of top-k slots each expert receives on `text` (1/E each under perfect balance).

    The text is read in up to `max_windows` windows of `seq_len` bytes (all whole windows when None).
    """
    data = text.encode("utf-8")
    n_windows = len(data) // seq_len if max_windows is None else min(max_windows, len(data) // seq_len)
    ids = torch.tensor(list(data[: n_windows * seq_len])).view(n_windows, seq_len)  # [N, L]
    device = next(moe.parameters()).device
    E, K = moe.config.num_experts, moe.config.num_experts_per_tok
    counts = torch.zeros(moe.config.num_hidden_layers, E)  # [layers, E]
    for batch in ids.split(batch_size):
        router_logits = moe(input_ids=batch.to(device), output_router_logits=True).router_logits
        for layer, logits in enumerate(router_logits):  # [T, E] per layer
            counts[layer] += torch.bincount(logits.topk(K, dim=-1).indices.flatten(), minlength=E).cpu()
    return (counts / counts.sum(dim=1, keepdim=True)).tolist()


def moe_parameter_counts(moe: Qwen3MoeForCausalLM) -> dict[str, int]:
    experts = [layer.mlp.experts for layer in moe.model.layers]
    expert_params = sum(e.gate_up_proj.numel() + e.down_proj.numel() for e in experts)
    idle_share = 1 - moe.config.num_experts_per_tok / moe.config.num_experts
    return {
        "moe_total": moe.num_parameters(),
        "moe_experts": expert_params,
        "moe_active_per_token": moe.num_parameters() - round(expert_params * idle_share),
    }


def prepare(args: argparse.Namespace) -> tuple[PreTrainedTokenizerFast, torch.Tensor, str]:
    """Threads and seed set; the byte tokenizer, the train split's token ids and the validation text to score."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = byte_tokenizer()
    train_ids = encode_checked(tokenizer, read_split("train"))
    return tokenizer, train_ids, read_split("validation")[: args.eval_bytes]


def moe_config(experts: dict, seq_len: int, balance_coef: float) -> Qwen3MoeConfig:
    """ARCHITECTURE with `experts` (count, width, top-k, ...) in every layer, set up for loss_with_per_layer_balance."""
    return Qwen3MoeConfig(
        **ARCHITECTURE,
        **experts,
        max_position_embeddings=seq_len,
        router_aux_loss_coef=balance_coef,
        output_router_logits=True,
    )


def save_moe(moe: Qwen3MoeForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> Qwen3MoeForCausalLM:
    """Saves the trained MoE in bfloat16 with its tokenizer, and returns it as read back (fp32), the model shipped."""
    # Off in the shipped config: with it on, a user's loss(labels=...) would silently include the aux loss.
    moe.config.output_router_logits = False
    moe.config.use_cache = True  # Trainer turns the KV cache off for training; generate() wants it
    moe.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return load_testbed(torch.float32, out)[0]


def run_record(
    module: str, argv: list[str] | None, args: argparse.Namespace, seconds: dict[str, float]
) -> dict[str, object]:
    """The head of training_stats.json: the command that remakes the model, its settings and the wall time per phase."""
    return {
        "command": " ".join([f"python -m {module}", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "seconds": {phase: round(s) for phase, s in seconds.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    seconds = {"start": time.time()}
    tokenizer, train_ids, validation = prepare(args)

    dense = Qwen3ForCausalLM(Qwen3Config(**ARCHITECTURE, max_position_embeddings=args.seq_len))
    dense_windows = RandomWindows(train_ids, args.seq_len, args.dense_steps * args.batch_size, args.seed)
    fit(dense, dense_windows, args.dense_lr, args)
    seconds["dense"] = time.time() - seconds["start"]

    torch.manual_seed(args.seed)
    experts = {**MOE, "moe_intermediate_size": ARCHITECTURE["intermediate_size"]}
    config = moe_config(experts, args.seq_len, ROUTER_AUX_LOSS_COEF)
    moe = upcycle(dense, config)
    # seed + 1: the MoE reads fresh windows rather than replaying the dense model's
    moe_windows = RandomWindows(train_ids, args.seq_len, args.moe_steps * args.batch_size, args.seed + 1)
    fit(moe, moe_windows, args.moe_lr, args, loss_with_per_layer_balance(config))
    seconds["moe"] = time.time() - seconds["start"] - seconds["dense"]
    shipped = save_moe(moe, tokenizer, args.out)

    models = {"dense": dense.eval(), "moe": shipped}
    losses = {name: heldout_loss(model, validation, args.seq_len) for name, model in models.items()}
    seconds["total"] = time.time() - seconds.pop("start")
    stats = {
        **run_record("moe_compress.testbed.train", argv, args, seconds),
        "architecture": {
            **ARCHITECTURE,
            **MOE,
            "initializer_range": config.initializer_range,
            "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF,
        },
        "parameters": {"dense": dense.num_parameters(), **moe_parameter_counts(shipped)},
        "validation_bytes": len(validation.encode("utf-8")),
        "heldout_nats_per_byte": losses,
        "moe_beats_dense": losses["moe"] < losses["dense"],
        "expert_spread": expert_spread(shipped),
        "expert_load": expert_load(shipped, validation, args.seq_len),
    }
    (args.out / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_card(args.out, stats)
    return stats


if __name__ == "__main__":
    main()
