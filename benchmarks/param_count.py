"""Question 4: the seed's own claim, 470M parameters per layer-projection before and 73M after (ratio 0.155), for 8
experts of hidden 4096, width 14336, rank 64 (Mixtral-8x7B's shapes)."""

from __future__ import annotations

from moe_compress.compression.budget import stored_params

CLAIM = {"before": 470e6, "after": 73e6, "ratio": 0.155}


def run(quick: bool = False) -> dict:
    E, out_f, in_f, rank = 8, 14336, 4096, 64
    before, after = E * out_f * in_f, stored_params(E, out_f, in_f, rank)
    return {"before": before, "after": after, "ratio": after / before,
            "after_holds": abs(after - CLAIM["after"]) / CLAIM["after"] < 0.02,
            "before_holds": abs(before - CLAIM["before"]) / CLAIM["before"] < 0.02}


def markdown(result: dict) -> str:
    verdict = "holds" if result["after_holds"] else "does not hold"
    return (
        f"For 8 experts of 14336 x 4096 (Mixtral-8x7B's gate, up or down projection), rank 64, this implementation "
        f"stores out*in + E*2r*(out+in) = **{result['after']:,}** parameters against {result['before']:,} dense "
        f"(ratio **{result['ratio']:.4f}**). The seed's 470M before {'holds' if result['before_holds'] else 'does not hold'}; "
        f"its 73M after (ratio 0.155) {verdict}: the exact count is {result['after'] / 1e6:.1f}M, "
        f"{100 * (result['after'] / CLAIM['after'] - 1):+.1f}% from the claim (the core alone is "
        f"{14336 * 4096 / 1e6:.1f}M and the wrappers add {(result['after'] - 14336 * 4096) / 1e6:.1f}M)."
    )


if __name__ == "__main__":
    print(markdown(run()))
