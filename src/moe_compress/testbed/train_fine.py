"""Makes the fine-grained testbed the way OLMoE was made: many narrow experts, trained from scratch.

    python -m moe_compress.testbed.train_fine --out <dir>   # the defaults make the shipped model in testbed/fine/

The upcycled testbed's experts start as copies of one dense MLP and stay close to each other; these start random.
Same byte tokenizer and backbone as the upcycled testbed (train.py), but each layer holds 32 experts of width 64 with
top-4 routing (Qwen3-30B-A3B and OLMoE use 128 and 64 experts, top-8): as many expert parameters as the upcycled
testbed's 8 experts of width 256, an eighth of them active per token.

1. a Qwen3-MoE with random experts and router, every layer MoE;
2. trained on random 256-byte windows of the train split, with the Switch load-balancing loss of each layer averaged
   over layers (--balance-coef), so that no expert dies;
3. held-out loss on the validation split, then the model (bf16 safetensors), tokenizer, model card and
   training_stats.json are saved to --out.

Every random choice is seeded by --seed; runs on one CPU thread by default. The experts run through transformers'
default experts implementation, grouped_mm: 0.52 s a training step on one thread, eager 0.57 s, batched_mm 19 s.
"""

import argparse
import json
import time

from transformers import Qwen3MoeForCausalLM

from moe_compress.testbed import FINE_TESTBED_DIR, heldout_loss
from moe_compress.testbed.card import write_fine_card
from moe_compress.testbed.train import (
    ARCHITECTURE,
    RandomWindows,
    expert_distance,
    expert_load,
    expert_spread,
    fit,
    loss_with_per_layer_balance,
    moe_config,
    moe_parameter_counts,
    prepare,
    run_record,
    save_moe,
    testbed_parser,
)

# ARCHITECTURE's intermediate_size would be the width of a dense MLP layer; there is none (mlp_only_layers is empty).
FINE_MOE = {
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 64,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}
# The held-out loss is also recorded on this many first validation windows, few enough for a test to recompute.
TEST_WINDOWS = 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = testbed_parser(__doc__, FINE_TESTBED_DIR)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--balance-coef", type=float, default=0.01, help="weight of the per-layer balance loss")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    seconds = {"start": time.time()}
    tokenizer, train_ids, validation = prepare(args)

    config = moe_config(FINE_MOE, args.seq_len, args.balance_coef)
    moe = Qwen3MoeForCausalLM(config)  # experts and router drawn at random: nothing is copied
    windows = RandomWindows(train_ids, args.seq_len, args.steps * args.batch_size, args.seed)
    fit(moe, windows, args.lr, args, loss_with_per_layer_balance(config))
    seconds["train"] = time.time() - seconds["start"]
    shipped = save_moe(moe, tokenizer, args.out)

    losses = {
        "validation": heldout_loss(shipped, validation, args.seq_len),
        f"first_{TEST_WINDOWS}_windows": heldout_loss(
            shipped, validation, args.seq_len, max_tokens=TEST_WINDOWS * args.seq_len + 1
        ),
    }
    seconds["total"] = time.time() - seconds.pop("start")
    stats = {
        **run_record("moe_compress.testbed.train_fine", argv, args, seconds),
        "architecture": {
            **ARCHITECTURE,
            **FINE_MOE,
            "initializer_range": config.initializer_range,
            "router_aux_loss_coef": args.balance_coef,
        },
        "parameters": moe_parameter_counts(shipped),
        "validation_bytes": len(validation.encode("utf-8")),
        "heldout_nats_per_byte": losses,
        "expert_spread": expert_spread(shipped),
        "expert_distance": expert_distance(shipped),
        "expert_load": expert_load(shipped, validation, args.seq_len, max_windows=None),
    }
    (args.out / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_fine_card(args.out, stats)
    return stats


if __name__ == "__main__":
    main()
