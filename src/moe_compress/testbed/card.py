"""The testbeds' model cards: README.md in each model folder, written from its training script's stats.

Both cards share the tokenizer, architecture, held-out loss, experts, use and data sections; `write_card` tells how
the upcycled testbed was made (train.py), `write_fine_card` how the fine-grained one was (train_fine.py).
"""

import math
from pathlib import Path

TOKENIZER_STEP = """\
**Tokenizer**: byte-level, token id = byte value, vocabulary of exactly 256 (tokenizers BPE without merges over the
   ByteLevel alphabet), lossless on any UTF-8 text. Byte 0 (NUL, absent from text) is bos, eos and pad."""
OPTIMIZER = "AdamW (lr {lr}, beta2 0.95, weight decay 0.1), 5% warmup, cosine decay, gradient clipping at 1."
SAVED_STEP = "**Saved** in bfloat16 safetensors, with the tokenizer. `output_router_logits` is off in the saved config."
DATA = """## Data

Tiny Shakespeare (`../data/tinyshakespeare.txt`, public domain), the char-rnn / nanoGPT corpus: 1,115,394 ASCII
characters. The figures above are also in `training_stats.json`.
"""


def verdict(losses: dict[str, float]) -> str:
    gap = losses["dense"] - losses["moe"]
    if gap > 0:
        return f"The upcycled MoE beats the dense model it started from by {gap:.3f} nats per byte."
    return f"The upcycled MoE does not beat the dense model it started from: it is {-gap:.3f} nats per byte worse."


def made_by(stats: dict) -> str:
    return f"""    {stats["command"]}

Seed: {stats["settings"]["seed"]}, for every random choice. CPU threads: {stats["settings"]["threads"]}."""


def bytes_seen(steps: int, settings: dict) -> int:
    return steps * settings["batch_size"] * settings["seq_len"]


def steps_seen(steps: int, settings: dict) -> str:
    return f"Steps: {steps}, of {settings['batch_size']} windows of {settings['seq_len']} bytes \
({bytes_seen(steps, settings):,} bytes seen)."


def architecture(stats: dict, experts_row: str, parameter_rows: dict[str, int]) -> str:
    arch, settings = stats["architecture"], stats["settings"]
    parameters = "\n".join(f"| {name} | {count:,} |" for name, count in parameter_rows.items())
    return f"""## Architecture

| | |
|---|---|
| layers | {arch["num_hidden_layers"]}, every one an MoE layer |
| hidden size | {arch["hidden_size"]} |
| attention | {arch["num_attention_heads"]} query heads, {arch["num_key_value_heads"]} key-value heads, head dim \
{arch["head_dim"]}, RoPE, QK-norm (Qwen3) |
| experts | {experts_row} |
| vocabulary | {arch["vocab_size"]} bytes, tied input and output embeddings |
| context | {settings["seq_len"]} bytes trained |

| parameters | count |
|---|---|
{parameters}"""


def heldout(stats: dict, loss_rows: dict[str, float]) -> str:
    rows = "\n".join(f"| {name} | {loss:.4f} | {loss / math.log(2):.3f} |" for name, loss in loss_rows.items())
    return f"""## Held-out loss

Scored by `moe_compress.testbed.heldout_loss` (non-overlapping {stats["settings"]["seq_len"]}-byte windows, mean \
next-byte
cross-entropy) on the validation split: the last 10% of Tiny Shakespeare, cut at a newline.
Validation text: {stats["validation_bytes"]:,} bytes (a last partial window is not scored).
A uniform guess scores ln 256 = 5.545 nats per byte.

| model | nats per byte | bits per byte |
|---|---|---|
{rows}"""


def expert_table(columns: dict[str, list[float]]) -> str:
    header = "| layer | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns)
    rows = [f"| {i} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for i, row in enumerate(zip(*columns.values()))]
    return "\n".join([header, *rows])


def use(load_call: str, imports: str = "heldout_loss, load_testbed, read_split") -> str:
    return f"""## Use

```python
from moe_compress.testbed import {imports}

model, tokenizer = {load_call}
print(heldout_loss(model, read_split("validation")))
ids = model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=100, do_sample=True)
print(tokenizer.decode(ids[0]))
```"""


def write_card(folder: Path, stats: dict) -> None:
    """The upcycled testbed's card (train.py)."""
    settings, arch, params = stats["settings"], stats["architecture"], stats["parameters"]
    losses, seconds, load = stats["heldout_nats_per_byte"], stats["seconds"], stats["expert_load"]
    experts, top_k = arch["num_experts"], arch["num_experts_per_tok"]
    experts_row = (
        f"{experts} per layer, SwiGLU width {arch['intermediate_size']} (the dense MLP's width), top-{top_k}, "
        "renormalised weights"
    )
    parameter_rows = {
        "dense model": params["dense"],
        "MoE, total": params["moe_total"],
        "MoE, in experts": params["moe_experts"],
        "MoE, active per token": params["moe_active_per_token"],
    }
    loss_rows = {"dense (fp32, as upcycled)": losses["dense"], "MoE (as shipped, bf16 weights)": losses["moe"]}
    columns = {
        "expert spread": stats["expert_spread"],
        "smallest load share": [min(shares) for shares in load],
        "largest load share": [max(shares) for shares in load],
    }
    text = f"""# moe-compress testbed: a byte-level Qwen3-MoE trained on Tiny Shakespeare

A small real trained Mixture-of-Experts language model, so that compression quality can be measured on weights that
mean something. Made the way Mixtral and Qwen-MoE were made: a dense model is trained, upcycled (its MLP copied into
every expert, a router added) and trained on so that the experts diverge.

## How it was made

{made_by(stats)}
Wall time: {seconds["total"]} s in all, {seconds["dense"]} s of it dense training and {seconds["moe"]} s MoE training.

1. {TOKENIZER_STEP}
2. **Dense**: `Qwen3ForCausalLM` trained with transformers' Trainer on random windows of the train split.
   {steps_seen(settings["dense_steps"], settings)}
   {OPTIMIZER.format(lr=settings["dense_lr"])}
3. **Upcycling**: a `Qwen3MoeForCausalLM` with the dense model's attention, norms and embeddings; each layer's dense
   MLP copied into all {experts} experts; the router initialised normal with std {arch["initializer_range"]}.
   With renormalised top-{top_k} weights the upcycled model computes exactly the dense model until training moves
   the experts apart.
4. **MoE**: trained on the same way, on fresh windows, plus the Switch load-balancing loss of each layer, averaged
   over layers (transformers' own pools all layers, which let single layers starve experts in a first attempt).
   Steps: {settings["moe_steps"]} ({bytes_seen(settings["moe_steps"], settings):,} bytes seen), \
lr {settings["moe_lr"]}, balance coefficient {arch["router_aux_loss_coef"]}.
5. {SAVED_STEP}

{architecture(stats, experts_row, parameter_rows)}

{heldout(stats, loss_rows)}

{verdict(losses)}
The comparison is not compute-matched: the MoE trained {settings["moe_steps"]} steps more than the dense model, so its
gain includes what more training alone would give.

## Experts

Expert spread is mean_e ‖W_e − W̄‖ / ‖W̄‖ over each expert's weights (0 right after upcycling); load share is the
fraction of top-{top_k} slots an expert receives on up to 32 validation windows.
Perfect balance gives each expert {1 / experts:.3f}.

{expert_table(columns)}

{use("load_testbed()")}

{DATA}"""
    (folder / "README.md").write_text(text, encoding="utf-8")


def write_fine_card(folder: Path, stats: dict) -> None:
    """The fine-grained testbed's card (train_fine.py)."""
    settings, arch, params = stats["settings"], stats["architecture"], stats["parameters"]
    losses, seconds, load = stats["heldout_nats_per_byte"], stats["seconds"], stats["expert_load"]
    experts, top_k, fair = arch["num_experts"], arch["num_experts_per_tok"], 1 / arch["num_experts"]
    subset = next(name for name in losses if name != "validation")  # first_<N>_windows
    width = arch["moe_intermediate_size"]
    experts_row = f"{experts} per layer, SwiGLU width {width}, top-{top_k}, renormalised weights"
    parameter_rows = {
        "total": params["moe_total"],
        "in experts": params["moe_experts"],
        "active per token": params["moe_active_per_token"],
    }
    loss_rows = {
        "MoE (as shipped, bf16 weights), whole validation split": losses["validation"],
        f"the same, {subset.replace('_', ' ')} only (what the tests recompute)": losses[subset],
    }
    columns = {
        "expert distance": stats["expert_distance"],
        "expert spread": stats["expert_spread"],
        "smallest load share": [min(shares) for shares in load],
        "smallest / fair": [min(shares) / fair for shares in load],
        "largest load share": [max(shares) for shares in load],
    }
    imports = "FINE_TESTBED_DIR, heldout_loss, load_testbed, read_split"
    text = f"""# moe-compress testbed_fine: a fine-grained byte-level Qwen3-MoE trained from scratch on Tiny Shakespeare

The second bundled Mixture-of-Experts model, shaped like Qwen3-30B-A3B and OLMoE: many narrow experts, several active
per token, trained from scratch. The first testbed (`../model/`) was upcycled, its experts copied from one dense MLP,
so they share most of their weights and compress easily; these experts started independent and random.
`model=testbed_fine` selects it anywhere a model is asked for.

## How it was made

{made_by(stats)}
Wall time: {seconds["total"]} s in all, {seconds["train"]} s of it reading the corpus and training; the rest is saving
and scoring the held-out loss.

1. {TOKENIZER_STEP}
2. **From scratch, not upcycled**: a `Qwen3MoeForCausalLM` with every weight drawn at random (normal, std
   {arch["initializer_range"]}), experts and router included. No dense model, no copied weights.
3. **Training** with transformers' Trainer on random windows of the train split (the first 90% of Tiny Shakespeare),
   plus the Switch load-balancing loss of each layer, averaged over layers, with coefficient
   {arch["router_aux_loss_coef"]} (transformers' own pools all layers, which lets single layers starve experts).
   {steps_seen(settings["steps"], settings)}
   {OPTIMIZER.format(lr=settings["lr"])}
4. {SAVED_STEP}

{architecture(stats, experts_row, parameter_rows)}

{heldout(stats, loss_rows)}

The validation split is disjoint from the train split: no byte of it was trained on.

## Experts

Load share is the fraction of top-{top_k} slots an expert receives on the whole validation split; perfect balance
gives each expert 1/{experts} = {fair:.4f}. No expert is dead: the least used one of any layer receives
{min(map(min, load)) / fair:.2f} of its fair share. Expert distance is mean_e ‖W_e − W̄‖ / ‖W_e‖, the part of each
expert not common to all its layer's experts (0 for copies, √(1 − 1/{experts}) = {math.sqrt(1 - fair):.3f} for
independent random ones); expert spread is mean_e ‖W_e − W̄‖ / ‖W̄‖, as on the upcycled testbed's card.

{expert_table(columns)}

{use("load_testbed(path=FINE_TESTBED_DIR)", imports)}

{DATA}"""
    (folder / "README.md").write_text(text, encoding="utf-8")
