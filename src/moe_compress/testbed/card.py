"""The testbed's model card: README.md in the model folder, written from the training script's stats."""

import math
from pathlib import Path


def verdict(losses: dict[str, float]) -> str:
    gap = losses["dense"] - losses["moe"]
    if gap > 0:
        return f"The upcycled MoE beats the dense model it started from by {gap:.3f} nats per byte."
    return f"The upcycled MoE does not beat the dense model it started from: it is {-gap:.3f} nats per byte worse."


def expert_table(spread: list[float], load: list[list[float]]) -> str:
    rows = [
        f"| {i} | {s:.3f} | {min(shares):.3f} | {max(shares):.3f} |" for i, (s, shares) in enumerate(zip(spread, load))
    ]
    header = "| layer | expert spread | smallest load share | largest load share |\n|---|---|---|---|"
    return "\n".join([header, *rows])


def write_card(folder: Path, stats: dict) -> None:
    settings, arch, params = stats["settings"], stats["architecture"], stats["parameters"]
    losses, seconds = stats["heldout_nats_per_byte"], stats["seconds"]
    window_bytes = settings["batch_size"] * settings["seq_len"]
    experts, top_k = arch["num_experts"], arch["num_experts_per_tok"]
    text = f"""# moe-compress testbed: a byte-level Qwen3-MoE trained on Tiny Shakespeare

A small real trained Mixture-of-Experts language model, so that compression quality can be measured on weights that
mean something. Made the way Mixtral and Qwen-MoE were made: a dense model is trained, upcycled (its MLP copied into
every expert, a router added) and trained on so that the experts diverge.

## How it was made

    {stats["command"]}

Seed: {settings["seed"]}, for every random choice. CPU threads: {settings["threads"]}.
Wall time: {seconds["total"]} s in all, {seconds["dense"]} s of it dense training and {seconds["moe"]} s MoE training.

1. **Tokenizer**: byte-level, token id = byte value, vocabulary of exactly 256 (tokenizers BPE without merges over the
   ByteLevel alphabet), lossless on any UTF-8 text. Byte 0 (NUL, absent from text) is bos, eos and pad.
2. **Dense**: `Qwen3ForCausalLM` trained with transformers' Trainer on random windows of the train split.
   Steps: {settings["dense_steps"]}, of {settings["batch_size"]} windows of {settings["seq_len"]} bytes \
({settings["dense_steps"] * window_bytes:,} bytes seen).
   AdamW (lr {settings["dense_lr"]}, beta2 0.95, weight decay 0.1), 5% warmup, cosine decay, gradient clipping at 1.
3. **Upcycling**: a `Qwen3MoeForCausalLM` with the dense model's attention, norms and embeddings; each layer's dense
   MLP copied into all {experts} experts; the router initialised normal with std {arch["initializer_range"]}.
   With renormalised top-{top_k} weights the upcycled model computes exactly the dense model until training moves
   the experts apart.
4. **MoE**: trained on the same way, on fresh windows, plus the Switch load-balancing loss of each layer, averaged
   over layers (transformers' own pools all layers, which let single layers starve experts in a first attempt).
   Steps: {settings["moe_steps"]} ({settings["moe_steps"] * window_bytes:,} bytes seen), lr {settings["moe_lr"]}, \
balance coefficient {arch["router_aux_loss_coef"]}.
5. **Saved** in bfloat16 safetensors, with the tokenizer. `output_router_logits` is off in the saved config.

## Architecture

| | |
|---|---|
| layers | {arch["num_hidden_layers"]}, every one an MoE layer |
| hidden size | {arch["hidden_size"]} |
| attention | {arch["num_attention_heads"]} query heads, {arch["num_key_value_heads"]} key-value heads, head dim \
{arch["head_dim"]}, RoPE, QK-norm (Qwen3) |
| experts | {experts} per layer, SwiGLU width {arch["intermediate_size"]} (the dense MLP's width), top-{top_k}, \
renormalised weights |
| vocabulary | {arch["vocab_size"]} bytes, tied input and output embeddings |
| context | {settings["seq_len"]} bytes trained |

| parameters | count |
|---|---|
| dense model | {params["dense"]:,} |
| MoE, total | {params["moe_total"]:,} |
| MoE, in experts | {params["moe_experts"]:,} |
| MoE, active per token | {params["moe_active_per_token"]:,} |

## Held-out loss

Scored by `moe_compress.testbed.heldout_loss` (non-overlapping {settings["seq_len"]}-byte windows, mean next-byte
cross-entropy) on the validation split: the last 10% of Tiny Shakespeare, cut at a newline.
Validation text: {stats["validation_bytes"]:,} bytes (a last partial window is not scored).
A uniform guess scores ln 256 = 5.545 nats per byte.

| model | nats per byte | bits per byte |
|---|---|---|
| dense (fp32, as upcycled) | {losses["dense"]:.4f} | {losses["dense"] / math.log(2):.3f} |
| MoE (as shipped, bf16 weights) | {losses["moe"]:.4f} | {losses["moe"] / math.log(2):.3f} |

{verdict(losses)}
The comparison is not compute-matched: the MoE trained {settings["moe_steps"]} steps more than the dense model, so its
gain includes what more training alone would give.

## Experts

Expert spread is mean_e ‖W_e − W̄‖ / ‖W̄‖ over each expert's weights (0 right after upcycling); load share is the
fraction of top-{top_k} slots an expert receives on up to 32 validation windows.
Perfect balance gives each expert {1 / experts:.3f}.

{expert_table(stats["expert_spread"], stats["expert_load"])}

## Use

```python
from moe_compress.testbed import heldout_loss, load_testbed, read_split

model, tokenizer = load_testbed()
print(heldout_loss(model, read_split("validation")))
ids = model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=100, do_sample=True)
print(tokenizer.decode(ids[0]))
```

## Data

Tiny Shakespeare (`../data/tinyshakespeare.txt`, public domain), the char-rnn / nanoGPT corpus: 1,115,394 ASCII
characters. The figures above are also in `training_stats.json`.
"""
    (folder / "README.md").write_text(text, encoding="utf-8")
