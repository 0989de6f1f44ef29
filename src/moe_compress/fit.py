"""Zero-shot fit of shared cores and per-expert factors to a layer's expert weights.

W: [E, out, in], fp32. The wrapped form W_e ~ (I + A_e B_e^T) C (I + P_e Q_e^T) names A = U_out, B = V_out,
P = U_in, Q = V_in. Methods:
  als    (default) C = mean, then alternating closed-form fits of each side (reduced-rank regression), the side that
         can represent any rank-r delta first, and a conjugate-gradient refit of C after each round.
  adam   the seed recipe: C = mean, U = 0, V ~ N(0, 1), Adam on sum_e ||W_e - What_e||^2.
  delta  the additive baseline of equal storage, W_e ~ C + U_e V_e^T of rank 2r, by alternating SVD and mean.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from moe_compress.experts import wrapped_weights

# sees the factors after each side fit, core refit or Adam step; a side not fitted yet is None (the identity)
Callback = Optional[Callable[[dict[str, Optional[torch.Tensor]]], None]]
RIDGE = 1e-5  # relative to the largest squared singular value: keeps factors bounded where M is nearly singular


def relative_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    return ((W - W_hat).norm() / W.norm().clamp_min(1e-30)).item()


def _balance(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale the columns of A and B to equal norms: A B^T unchanged, both factors well scaled for bf16."""
    scale = (B.norm(dim=-2, keepdim=True) / A.norm(dim=-2, keepdim=True).clamp_min(1e-30)).sqrt()
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    return A * scale, B / scale


def reduced_rank_fit(R: torch.Tensor, M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over A, B [E, m, rank] of ||R - A B^T M||_F, with R [E, m, n] and M [E or 1, m, n].

    Reduced-rank regression: with M = U S V^T, the optimum makes A B^T M the best rank-r approximation of R V V^T.
    Eigendecompositions of Gram matrices of the smaller side stand in for SVDs (far faster on CPU and GPU); a small
    ridge on 1/S drops directions in which M is nearly singular.
    """
    m, n = M.shape[-2:]
    gram = M @ M.mT if m <= n else M.mT @ M
    s2, basis = torch.linalg.eigh(gram)  # ascending; basis = U if m <= n else V
    s2 = s2.clamp_min(0)
    inv = s2.sqrt() / (s2 + RIDGE * s2[..., -1:].clamp_min(1e-30))  # ~ 1 / S
    if m <= n:
        U = basis
        Y = (R @ M.mT) @ U * inv.unsqueeze(-2)  # R V with V = M^T U S^-1: [E, m, k]
    else:
        U = M @ basis * inv.unsqueeze(-2)
        Y = R @ basis
    _, W_y = torch.linalg.eigh(Y.mT @ Y)
    W_r = W_y[..., -rank:]  # top right singular vectors of Y: [E, k, r]
    A = Y @ W_r
    B = U @ (inv.unsqueeze(-1) * W_r)  # B^T M = W_r^T V^T
    return _balance(A, B)


def _out_side(W, C, P, Q, rank):
    M = wrapped_weights(C, None, None, P, Q)  # C (I + P Q^T)
    return reduced_rank_fit(W - M, M, rank)


def _in_side(W, C, A, B, rank):
    L = wrapped_weights(C, A, B, None, None)  # (I + A B^T) C; transposed, the input side is a left problem
    Q, P = reduced_rank_fit((W - L).mT, L.mT, rank)
    return P, Q


def _gram_factors(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G, H [E, n, 2r] with (I + U V^T)^T (I + U V^T) = I + G H^T, from U, V [E, n, r]."""
    return torch.cat([V, U + V @ (U.mT @ U)], -1), torch.cat([U, V], -1)


def refit_core(W, core, u_out, v_out, u_in, v_in, iters: int) -> torch.Tensor:
    """Conjugate gradient on the normal equations of C: sum_e L_e^T L_e C R_e R_e^T = sum_e L_e^T W_e R_e^T.

    L_e^T L_e = I + G_e H_e^T and R_e R_e^T = I + J_e K_e^T have rank-2r parts, so the operator is
    E C + sum_e (C J_e) K_e^T + sum_e G_e (H_e^T C (I + J_e K_e^T)): contractions over (e, 2r) that never form an
    [E, out, in] tensor, where multiplying out L_e C R_e would form several per CG step.
    """
    C, A, B, P, Q = core, u_out, v_out, u_in, v_in
    E = W.shape[0]
    G, H = _gram_factors(A, B)  # [E, out, 2r]
    J, K = _gram_factors(Q, P)  # R_e R_e^T = (I + Q_e P_e^T)^T (I + Q_e P_e^T): [E, in, 2r]

    def normal(X: torch.Tensor) -> torch.Tensor:  # [1, out, in]
        HX = H.mT @ X  # [E, 2r, in]
        inner = HX + (HX @ J) @ K.mT
        return E * X + torch.einsum("eoq,eiq->oi", X @ J, K) + torch.einsum("eoq,eqi->oi", G, inner)

    WR = W + (W @ Q) @ P.mT  # W_e R_e^T
    residual = (WR + B @ (A.mT @ WR)).sum(0, keepdim=True) - normal(C)
    direction, rr = residual, (residual * residual).sum()
    for _ in range(iters):
        H_d = normal(direction)
        step = rr / (direction * H_d).sum().clamp_min(1e-30)
        C = C + step * direction
        residual = residual - step * H_d
        rr_next = (residual * residual).sum()
        direction, rr = residual + (rr_next / rr.clamp_min(1e-30)) * direction, rr_next
    return C


def fit_als(W: torch.Tensor, rank: int, iters: int = 3, core_iters: int = 5,
            callback: Callback = None) -> dict[str, torch.Tensor]:
    E, out_f, in_f = W.shape
    # A side not fitted yet is the identity (None), so the first side's problem has one M = C for all experts: one
    # Gram eigendecomposition instead of E
    f = {"core": W.mean(0, keepdim=True), "u_out": None, "v_out": None, "u_in": None, "v_in": None}
    input_first = out_f <= in_f  # that side alone can represent any rank-r delta W_e - C
    for _ in range(iters):
        for side in ("in", "out") if input_first else ("out", "in"):
            if side == "in":
                f["u_in"], f["v_in"] = _in_side(W, f["core"], f["u_out"], f["v_out"], rank)
            else:
                f["u_out"], f["v_out"] = _out_side(W, f["core"], f["u_in"], f["v_in"], rank)
            if callback is not None:
                callback(dict(f))
        f["core"] = refit_core(W, **f, iters=core_iters)
        if callback is not None:
            callback(dict(f))
    rows = {"u_out": out_f, "v_out": out_f, "u_in": in_f, "v_in": in_f}  # a side left unfitted (iters=0) is zero
    return {name: W.new_zeros(E, rows[name], rank) if t is None else t for name, t in f.items()}


def seed_init(W: torch.Tensor, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """The seed recipe's start: C = mean, U = 0, V ~ N(0, 1)."""
    E, out_f, in_f = W.shape
    generator = torch.Generator().manual_seed(seed)
    return {
        "core": W.mean(0, keepdim=True),
        "u_out": W.new_zeros(E, out_f, rank),
        "v_out": torch.randn(E, out_f, rank, generator=generator).to(W),
        "u_in": W.new_zeros(E, in_f, rank),
        "v_in": torch.randn(E, in_f, rank, generator=generator).to(W),
    }


def fit_adam(W: torch.Tensor, steps: int, lr: float, init: dict[str, torch.Tensor],
             callback: Callback = None) -> dict[str, torch.Tensor]:
    """Adam on sum_e ||W_e - What_e||^2 over all factors and the core, from `init`."""
    params = {name: t.detach().clone().requires_grad_(True) for name, t in init.items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = (W - wrapped_weights(**params)).square().sum()
            loss.backward()
            optimizer.step()
            if callback is not None:
                callback({name: p.detach() for name, p in params.items()})
    return {name: p.detach() for name, p in params.items()}


def _truncated_svd(D: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    root = S[..., :rank].sqrt().unsqueeze(-2)
    return U[..., :rank] * root, Vh[..., :rank, :].mT * root


def fit_delta(W: torch.Tensor, rank: int, iters: int = 3) -> dict[str, torch.Tensor]:
    """W_e ~ C + U_e V_e^T with rank 2r: the SVD of W_e - C, then C refit as the mean of what the factors leave."""
    C = W.mean(0, keepdim=True)
    for step in range(iters):
        U, V = _truncated_svd(W - C, 2 * rank)
        if step < iters - 1:
            C = (W - U @ V.mT).mean(0, keepdim=True)
    return {"core": C, "u": U, "v": V}
