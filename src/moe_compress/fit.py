"""Zero-shot fit of shared cores and per-expert factors to a layer's expert weights.

W: [E, out, in], fp32. The wrapped form W_e ~ (I + A_e B_e^T) C (I + P_e Q_e^T) names A = U_out, B = V_out,
P = U_in, Q = V_in. Methods:
  als    (default) C = mean, then alternating closed-form fits of each side (reduced-rank regression), the side that
         can represent any rank-r delta first, and a conjugate-gradient refit of C after each round.
  adam   the seed recipe: C = mean, U = 0, V ~ N(0, 1), Adam on sum_e ||W_e - What_e||^2.
  delta  the additive baseline of equal storage, W_e ~ C + U_e V_e^T of rank 2r, by alternating SVD and mean.
  basis  W_e ~ C + U_e V^T with one input basis V [in, k] shared by the experts (gate, up), or C + U V_e^T with one
         output basis U [out, k] (down): the top-k principal directions of the experts' deviations from the core.

als, delta and basis also fit in a calibrated metric: given M [E, in, in] (M_e the Gram of the inputs routed to expert e,
SPD), they minimise sum_e tr((W_e - What_e) M_e (W_e - What_e)^T), the output error on those inputs, instead of
sum_e ||W_e - What_e||_F^2. C starts at the RegMean form (sum_e W_e M_e)(sum_e M_e)^-1 instead of the mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_compress.experts import wrapped_weights

# sees the factors after each side fit, core refit or Adam step; a side not fitted yet is None (the identity)
Callback = Callable[[dict[str, torch.Tensor | None]], None] | None
# relative to the largest squared singular value (with a right metric, of the whitened M N_r^1/2): keeps factors
# bounded where M is nearly singular
RIDGE = 1e-5
CHUNK_ELEMENTS = 2**24  # per-expert products in the error are taken this many elements of W at a time


def cholesky(M: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors [..., n, n] in fp64 of SPD matrices. Where rounding makes one fail (the Gram of a rarely
    routed expert can be badly conditioned even after damping), all get a jitter of up to 1e-6 of their mean
    diagonal."""
    M = M.double()
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    scale = M.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    for jitter in (0.0, 1e-12, 1e-9, 1e-6):
        L, info = torch.linalg.cholesky_ex(M + jitter * scale * eye)
        if not info.any():
            return L
    raise ValueError("the metric is not positive definite, even with a jitter of 1e-6 of its mean diagonal; damp "
                     "each Gram before the fit (e.g. M_e + 0.01 * mean(diag(M_e)) * I)")


def _spd_inverse(X: torch.Tensor) -> torch.Tensor:
    return torch.cholesky_inverse(cholesky(X)).to(X.dtype)


@dataclass(frozen=True)
class Metric:
    """A metric M [E, in, in] prepared once per fit of W: the sums over experts that the core fits need."""

    M: torch.Tensor  # [E, in, in], W's dtype
    total: torch.Tensor  # sum_e M_e: [in, in]
    total_root: torch.Tensor  # Cholesky factor of sum_e M_e, fp64: [in, in]
    target: torch.Tensor  # sum_e W_e M_e: [1, out, in]

    @classmethod
    def of(cls, W: torch.Tensor, M: torch.Tensor) -> Metric:
        E, _, in_f = W.shape
        if M.shape != (E, in_f, in_f):
            raise ValueError(f"metric has shape {tuple(M.shape)}; it needs one input Gram per expert, "
                             f"[E, in, in] = [{E}, {in_f}, {in_f}]")
        if not all(torch.isfinite(M_e).all() for M_e in M):  # per expert: isfinite(M) takes 1.75x M in temporaries
            raise ValueError("metric holds NaN or Inf values; check the calibration statistics")
        M = M.to(W.dtype)
        total = M.sum(0)
        return cls(M, total, cholesky(total), torch.einsum("eoi,eij->oj", W, M).unsqueeze(0))

    def solve(self, X: torch.Tensor) -> torch.Tensor:
        """X (sum_e M_e)^-1, in fp64."""
        return torch.cholesky_solve(X.double().mT, self.total_root).mT.to(X.dtype)

    def regmean(self) -> torch.Tensor:
        """(sum_e W_e M_e)(sum_e M_e)^-1, the core that minimises the error while the wrappers are the identity."""
        return self.solve(self.target)


def _squared_error(D: torch.Tensor, M: torch.Tensor | None) -> torch.Tensor:
    """sum_e tr(D_e M_e D_e^T) (||D||_F^2 without a metric), summed in fp64, without an [E, out, in] temporary.
    Clamped at 0: rounding can take a tiny error in a nearly singular fp32 metric below it."""
    if M is None:
        return D.square().sum(dtype=torch.float64)
    step = max(1, CHUNK_ELEMENTS // D[0].numel())
    return sum(((D[e:e + step] @ M[e:e + step]) * D[e:e + step]).sum(dtype=torch.float64)
               for e in range(0, D.shape[0], step)).clamp_min(0)


def relative_error(W: torch.Tensor, W_hat: torch.Tensor, metric: torch.Tensor | None = None) -> float:
    """||W - W_hat|| / ||W||; with a metric M [E, in, in], sqrt(sum_e tr(D_e M_e D_e^T) / sum_e tr(W_e M_e W_e^T))."""
    if metric is None:
        return ((W - W_hat).norm() / W.norm().clamp_min(1e-30)).item()
    metric = metric.to(W.dtype)
    return (_squared_error(W - W_hat, metric) / _squared_error(W, metric).clamp_min(1e-30)).sqrt().item()


def _balance(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale the columns of A and B to equal norms: A B^T unchanged, both factors well scaled for bf16."""
    scale = (B.norm(dim=-2, keepdim=True) / A.norm(dim=-2, keepdim=True).clamp_min(1e-30)).sqrt()
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    return A * scale, B / scale


def reduced_rank_fit(R: torch.Tensor, M: torch.Tensor, rank: int, left: torch.Tensor | None = None,
                     right: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over A, B [E, m, rank] of ||N_l^1/2 (R - A B^T M) N_r^1/2||_F, with R [E, m, n], M [E or 1, m, n] and
    optional SPD metrics N_l = left [E, m, m], N_r = right [E, n, n] (None: the identity).

    Reduced-rank regression: with M N_r^1/2 = U S V^T, the optimum makes N_l^1/2 A B^T M N_r^1/2 the best rank-r
    approximation of N_l^1/2 R N_r^1/2 V V^T. Eigendecompositions of Gram matrices of the smaller side stand in for
    SVDs (far faster on CPU and GPU); a small ridge on 1/S drops directions in which M is nearly singular. The left
    metric only changes the Gram whose top eigenvectors truncate (Y^T N_l Y for Y^T Y), and the right one enters
    through N_r itself, or through its Cholesky factor where M has more rows than columns: no metric is inverted.
    """
    m, n = M.shape[-2:]
    root = None
    if m <= n:
        MN = M if right is None else M @ right
        gram = MN @ M.mT
    else:
        gram = M.mT @ M
        if right is not None:  # with N_r = L L^T, the Gram of M L is L^T (M^T M) L: M^T M is shared when M is
            root = cholesky(right).to(M.dtype)
            gram = root.mT @ gram @ root
    s2, basis = torch.linalg.eigh(gram)  # ascending; basis = U if m <= n else V
    s2 = s2.clamp_min(0)
    inv = s2.sqrt() / (s2 + RIDGE * s2[..., -1:].clamp_min(1e-30))  # ~ 1 / S
    if m <= n:
        U = basis
        Y = (R @ MN.mT) @ U * inv.unsqueeze(-2)  # R N_r^1/2 V with V = N_r^1/2 M^T U S^-1: [E, m, k]
    else:
        if root is not None:
            basis = root @ basis  # N_r^1/2 V
        U = M @ basis * inv.unsqueeze(-2)
        Y = R @ basis
    _, W_y = torch.linalg.eigh(Y.mT @ Y if left is None else Y.mT @ (left @ Y))
    W_r = W_y[..., -rank:]  # top right singular vectors of N_l^1/2 Y: [E, k, r]
    A = Y @ W_r
    B = U @ (inv.unsqueeze(-1) * W_r)  # B^T M N_r^1/2 = W_r^T V^T
    return _balance(A, B)


def _out_side(W, C, P, Q, rank, metric=None):
    K = wrapped_weights(C, None, None, P, Q)  # C (I + P Q^T); the metric multiplies the residual on the right
    return reduced_rank_fit(W - K, K, rank, right=metric)


def _in_side(W, C, A, B, rank, metric=None):
    J = wrapped_weights(C, A, B, None, None)  # (I + A B^T) C; transposed, the input side is a left problem
    Q, P = reduced_rank_fit((W - J).mT, J.mT, rank, left=metric)
    return P, Q


def _gram_factors(U: torch.Tensor, V: torch.Tensor,
                  M: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """G, H [E, n, 2r] with (I + U V^T)^T M (I + U V^T) = M + G H^T, from U, V [E, n, r] (M = I when None)."""
    MU = U if M is None else M @ U
    return torch.cat([V, MU + V @ (U.mT @ MU)], -1), torch.cat([MU, V], -1)


def refit_core(W, core, u_out, v_out, u_in, v_in, iters: int, metric: Metric | None = None) -> torch.Tensor:
    """Conjugate gradient on the normal equations of C: sum_e S_e^T S_e C T_e M_e T_e^T = sum_e S_e^T W_e M_e T_e^T,
    with S_e = I + A_e B_e^T, T_e = I + P_e Q_e^T and M_e = I without a metric.

    S_e^T S_e = I + G_e H_e^T and T_e M_e T_e^T = M_e + J_e K_e^T have rank-2r parts, so the operator is
    C sum_e M_e + sum_e (C J_e) K_e^T + sum_e G_e (H_e^T C (M_e + J_e K_e^T)): contractions over (e, 2r) that never
    form an [E, out, in] tensor, where multiplying out S_e C T_e would form several per CG step. With a metric, CG is
    preconditioned by X -> (sum_e S_e^T S_e)^-1 X (sum_e T_e M_e T_e^T)^-1, the operator with the sums over experts
    of its two sides taken apart: it takes out the anisotropy that the experts' inputs share (16 experts with strongly
    anisotropic inputs, after 5 steps: 1e-6 of the objective above the optimum, where plain CG leaves 4e-2 and
    (sum_e M_e)^-1 alone 8e-3). Without a metric plain CG already ends within 1e-8 of it.
    """
    C, A, B, P, Q = core, u_out, v_out, u_in, v_in
    E = W.shape[0]
    M = None if metric is None else metric.M
    G, H = _gram_factors(A, B)  # [E, out, 2r]
    J, K = _gram_factors(Q, P, M)  # T_e M_e T_e^T = (I + Q_e P_e^T)^T M_e (I + Q_e P_e^T): [E, in, 2r]

    def normal(X: torch.Tensor) -> torch.Tensor:  # [1, out, in]
        HX = H.mT @ X  # [E, 2r, in]
        inner = (HX if M is None else HX @ M) + (HX @ J) @ K.mT
        shared = E * X if M is None else X @ metric.total
        return shared + torch.einsum("eoq,eiq->oi", X @ J, K) + torch.einsum("eoq,eqi->oi", G, inner)

    if metric is None:
        WR = W + (W @ Q) @ P.mT  # W_e T_e^T
        rhs = (WR + B @ (A.mT @ WR)).sum(0, keepdim=True)
    else:  # W_e M_e T_e^T = W_e M_e + (W_e M_e Q_e) P_e^T: sum_e W_e M_e is the metric's, the rest is rank r
        WMQ = W @ (M @ Q)  # [E, out, r]
        AWMT = (A.mT @ W) @ M + (A.mT @ WMQ) @ P.mT  # A_e^T W_e M_e T_e^T: [E, r, in]
        rhs = metric.target + torch.einsum("eor,eir->oi", WMQ, P) + torch.einsum("eor,eri->oi", B, AWMT)
        eye = torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
        out_inv = _spd_inverse(E * eye + torch.einsum("eoq,epq->op", G, H))  # (sum_e S_e^T S_e)^-1
        in_inv = _spd_inverse(metric.total + torch.einsum("eiq,ejq->ij", J, K))  # (sum_e T_e M_e T_e^T)^-1
    precondition = (lambda X: X) if metric is None else (lambda X: out_inv @ X @ in_inv)
    residual = rhs - normal(C)
    z = precondition(residual)
    direction, rz = z, (residual * z).sum()
    for _ in range(iters):
        H_d = normal(direction)
        curvature = (direction * H_d).sum()
        # A metric whose damping is below fp32's rounding can leave the operator indefinite: no step along such a
        # direction (without a metric, curvature 0 means a zero direction, where the step is 0 anyway)
        step = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))
        C = C + step * direction
        residual = residual - step * H_d
        z = precondition(residual)
        rz_next = (residual * z).sum()
        direction, rz = z + (rz_next / rz.clamp_min(1e-30)) * direction, rz_next
    return C


def fit_als(W: torch.Tensor, rank: int, iters: int = 3, core_iters: int = 5, callback: Callback = None,
            metric: torch.Tensor | None = None, tol: float = 0.0) -> dict[str, torch.Tensor]:
    """Up to `iters` rounds of ALS; with a metric M [E, in, in], in the metric sum_e tr(D_e M_e D_e^T). A round whose
    relative improvement of the objective falls below `tol` is the last (tol = 0: always `iters` rounds; tol > 0 costs
    an evaluation of the objective per round: with a metric, 7-15% of a round at Qwen3-30B-A3B's shapes)."""
    if tol < 0:
        raise ValueError(f"tol={tol} is negative; use 0 for a fixed number of rounds or a small positive tolerance")
    E, out_f, in_f = W.shape
    prepared = None if metric is None else Metric.of(W, metric)
    M = None if prepared is None else prepared.M
    core = W.mean(0, keepdim=True) if prepared is None else prepared.regmean()
    # A side not fitted yet is the identity (None), so the first side's problem has one M = C for all experts: one
    # Gram eigendecomposition instead of E (with a metric too where the input side goes first: its metric is a left one)
    f = {"core": core, "u_out": None, "v_out": None, "u_in": None, "v_in": None}
    input_first = out_f <= in_f  # that side alone can represent any rank-r delta W_e - C
    objective = _squared_error(W - wrapped_weights(**f), M) if tol > 0 else None
    for _ in range(iters):
        for side in ("in", "out") if input_first else ("out", "in"):
            if side == "in":
                f["u_in"], f["v_in"] = _in_side(W, f["core"], f["u_out"], f["v_out"], rank, M)
            else:
                f["u_out"], f["v_out"] = _out_side(W, f["core"], f["u_in"], f["v_in"], rank, M)
            if callback is not None:
                callback(dict(f))
        f["core"] = refit_core(W, **f, iters=core_iters, metric=prepared)
        if callback is not None:
            callback(dict(f))
        if tol > 0:  # ALS converges linearly: a small relative gain now means small gains from then on
            objective, previous = _squared_error(W - wrapped_weights(**f), M), objective
            if _converged(previous, objective, tol):
                break
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


def _truncated_svd(D: torch.Tensor, rank: int,
                   M: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, V [E, *, rank] with U V^T the best rank-r approximation of D [E, out, in] in ||.||_F, or with a metric
    M [E, in, in] in sum_e tr((D_e - X_e) M_e (D_e - X_e)^T): SVD-LLM's [D_e L_e]_r L_e^-1 (M_e = L_e L_e^T); and the
    error it leaves, summed over experts in fp64: the spectrum below the rank, which the decomposition computes
    anyway."""
    if M is None:
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        root = S[..., :rank].sqrt().unsqueeze(-2)
        return U[..., :rank] * root, Vh[..., :rank, :].mT * root, _tail(S.square(), rank)
    out_f, in_f = D.shape[-2:]
    if out_f <= in_f:  # [D L]_r L^-1 = U_r U_r^T D, U_r the top eigenvectors of D M D^T: no square root of M needed
        s2, U = torch.linalg.eigh((D @ M) @ D.mT)
        U_r = U[..., -rank:]
        return *_balance(U_r, D.mT @ U_r), _tail(s2.flip(-1), rank)
    L = cholesky(M)
    DL = D @ L.to(D.dtype)
    s2, V = torch.linalg.eigh(DL.mT @ DL)
    V_r = V[..., -rank:]  # top right singular vectors of D L
    U, V = _balance(DL @ V_r, torch.linalg.solve_triangular(L.mT, V_r.double(), upper=True).to(D.dtype))
    return U, V, _tail(s2.flip(-1), rank)


def _tail(spectrum: torch.Tensor, rank: int) -> torch.Tensor:
    """The sum over experts of a descending spectrum [E, n] beyond its first `rank` values, in fp64."""
    return spectrum[..., rank:].clamp_min(0).sum(dtype=torch.float64)


def _converged(previous: torch.Tensor | None, objective: torch.Tensor, tol: float) -> bool:
    """Whether a round improved the objective by at most `tol` of its previous value (never with tol = 0)."""
    return tol > 0 and previous is not None and bool(previous - objective <= tol * previous)


def fit_delta(W: torch.Tensor, rank: int, iters: int = 3, metric: torch.Tensor | None = None,
              tol: float = 0.0) -> dict[str, torch.Tensor]:
    """W_e ~ C + U_e V_e^T with rank 2r: the SVD of W_e - C, then C refit as the mean of what the factors leave.
    With a metric M [E, in, in]: the whitened SVD, and the core in closed form,
    C = (sum_e (W_e - U_e V_e^T) M_e)(sum_e M_e)^-1. Up to `iters` rounds; the first whose SVD finds the objective
    improved by at most `tol` of its previous value is the last (tol = 0: always `iters`). The alternation converges
    linearly: on experts that are exactly of this form, 3 rounds left 0.7% of the logits' norm, 30 left 5e-5."""
    prepared = None if metric is None else Metric.of(W, metric)
    C = W.mean(0, keepdim=True) if prepared is None else prepared.regmean()
    previous = None
    for step in range(iters):
        U, V, objective = _truncated_svd(W - C, 2 * rank, None if prepared is None else prepared.M)
        if step == iters - 1 or _converged(previous, objective, tol):
            break
        previous = objective
        if prepared is None:
            C = (W - U @ V.mT).mean(0, keepdim=True)
        else:  # sum_e (W_e - U_e V_e^T) M_e = sum_e W_e M_e - sum_e U_e (V_e^T M_e): no [E, out, in] temporary
            C = prepared.solve(prepared.target - torch.einsum("eor,eri->oi", U, V.mT @ prepared.M))
    return {"core": C, "u": U, "v": V}


def _balance_shared(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale the columns of U [E or 1, out, k] and V [1 or E, in, k] to equal root-mean-square norms over experts:
    every U_e V_e^T unchanged, both factors well scaled for bf16."""
    def rms(X: torch.Tensor) -> torch.Tensor:
        return X.square().sum(-2).mean(0).sqrt()  # [k]

    scale = (rms(V) / rms(U).clamp_min(1e-30)).sqrt()
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    return U * scale, V / scale


def _top_eigenvectors(gram: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.eigh(gram.double())[1][..., -k:].flip(-1).to(gram.dtype)


def solve_u(R: torch.Tensor, V: torch.Tensor, M: torch.Tensor | None = None) -> torch.Tensor:
    """The U [E, out, k] minimising sum_e tr((R_e - U_e V_e^T) M_e (R_e - U_e V_e^T)^T) for fixed V [E or 1, in, k]
    (M_e = I when None): U_e = R_e M_e V_e (V_e^T M_e V_e)^-1, the least-squares output side."""
    MV = V if M is None else M @ V  # [E, in, k]
    return torch.linalg.solve((V.mT @ MV).double(), (R @ MV).mT.double()).mT.to(R.dtype)


def solve_v(R: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """The V [E, in, k] minimising sum_e tr((R_e - U_e V_e^T) M_e (R_e - U_e V_e^T)^T) for fixed U [E or 1, out, k]:
    V_e^T = (U_e^T U_e)^-1 U_e^T R_e, whatever the input metric M_e (it weighs only the side V_e spans freely)."""
    return torch.linalg.solve((U.mT @ U).double(), (U.mT @ R).double()).mT.to(R.dtype)


def _basis_in_step(R: torch.Tensor, M: torch.Tensor, V: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Given the shared input basis V [in, k]: each U_e = R_e M_e V (V^T M_e V)^-1 in closed form; then V refit by
    conjugate gradient from where it is, on its normal equations sum_e (U_e^T U_e) V^T M_e = sum_e U_e^T R_e M_e,
    preconditioned by their Kronecker approximation X -> (sum_e U_e^T U_e)^-1 X (sum_e M_e)^-1."""
    U = solve_u(R, V, M)  # [E, out, k]
    A = U.mT @ U  # [E, k, k]
    rhs = torch.einsum("eok,eoi->ki", U, R @ M)  # [k, in]
    left_inv, right_inv = _spd_inverse(A.sum(0)), _spd_inverse(M.sum(0))

    def normal(X: torch.Tensor) -> torch.Tensor:  # sum_e A_e X M_e: [k, in]
        return torch.einsum("ekl,eli->ki", A, X @ M)

    X = V.mT.contiguous()
    residual = rhs - normal(X)
    z = left_inv @ residual @ right_inv
    direction, rz = z, (residual * z).sum()
    for _ in range(iters):  # CG lowers the quadratic objective at every step, from the current V
        H_d = normal(direction)
        curvature = (direction * H_d).sum()
        step = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))
        X = X + step * direction
        residual = residual - step * H_d
        z = left_inv @ residual @ right_inv
        rz_next = (residual * z).sum()
        direction, rz = z + (rz_next / rz.clamp_min(1e-30)) * direction, rz_next
    return U, X.mT


def _principal_basis(R: torch.Tensor, rank: int, shared: str,
                     M: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The best shared basis of the deviations R [E, out, in] in closed form: U, V with U_e V_e^T the projection of
    R_e on the top-k eigenvectors of sum_e R_e^T R_e (shared input side) or sum_e R_e M_e R_e^T (shared output side,
    M_e = I without a metric; the input side has no closed form in a metric)."""
    if shared == "out":
        U = _top_eigenvectors(torch.einsum("eoi,epi->op", R if M is None else R @ M, R), rank).unsqueeze(0)
        return U, R.mT @ U  # V_e = R_e^T U: [E, in, k]
    V = _top_eigenvectors(torch.einsum("eoi,eoj->ij", R, R), rank).unsqueeze(0)
    return R @ V, V


def _whitened_input_basis(R: torch.Tensor, total: torch.Tensor, rank: int) -> torch.Tensor:
    """The start of a shared input basis in a metric: the principal components of R_e L (L L^T the experts' mean
    metric, total / E), mapped back by L^-T: [in, k]."""
    L = cholesky(total / R.shape[0]).to(R.dtype)
    V = _principal_basis(R @ L, rank, "in")[1][0]
    return torch.linalg.solve_triangular(L.mT.double(), V.double(), upper=True).to(R.dtype)


def factors_for_core(R: torch.Tensor, form: str, rank: int, shared: str = "in", metric: torch.Tensor | None = None,
                     solver_iters: int = 10) -> dict[str, torch.Tensor]:
    """The factors of `form` fitted to R = W - C for a core held fixed (a quantized one, say), R [E, out, in], as the
    form's own fit fits them: delta's (whitened) truncated SVD of rank 2r; a shared basis of width k = rank, closed
    form on the output side, from the whitened principal components and one alternation of the input side."""
    if form == "delta":
        U, V, _ = _truncated_svd(R, 2 * rank, metric)
        return {"u": U, "v": V}
    if form != "basis":
        raise ValueError(f"form {form!r} has no factors to fit for a fixed core; use delta or basis")
    if shared == "out":
        return dict(zip(("u", "v"), _balance_shared(*_principal_basis(R, rank, "out", metric))))
    if metric is None:
        return dict(zip(("u", "v"), _balance_shared(*_principal_basis(R, rank, "in"))))
    V = _whitened_input_basis(R, metric.sum(0), rank)
    U, V = _basis_in_step(R, metric, V, solver_iters)
    return dict(zip(("u", "v"), _balance_shared(U, V.unsqueeze(0))))


def fit_basis(W: torch.Tensor, rank: int, shared: str = "in", iters: int = 3,
              metric: torch.Tensor | None = None, solver_iters: int = 10, tol: float = 0.0) -> dict[str, torch.Tensor]:
    """W_e ~ C + U_e V^T (shared="in", V: [1, in, k]) or C + U V_e^T (shared="out", U: [1, out, k]); k = rank.

    Without a metric both are the principal components of the deviations R_e = W_e - mean (and the mean stays the
    optimal core). In a metric M [E, in, in], a shared output basis is still closed form given C (the top
    eigenvectors of sum_e R_e M_e R_e^T, V_e^T = U^T R_e); a shared input basis starts from the principal components
    of R_e L (L L^T the experts' mean metric), mapped back by L^-T, and alternates U_e (closed form) and V (conjugate
    gradient). Each of up to `iters` rounds then refits C in closed form: every step lowers the objective, and a round
    that lowers it by at most `tol` of its previous value is the last (tol = 0: always `iters`)."""
    if shared not in ("in", "out"):
        raise ValueError(f"shared={shared!r} is not a side; use 'in' or 'out'")
    if metric is None:
        C = W.mean(0, keepdim=True)
        U, V = _balance_shared(*_principal_basis(W - C, rank, shared))
        return {"core": C, "u": U, "v": V}
    prepared = Metric.of(W, metric)
    C = prepared.regmean()
    if shared == "in":
        V = _whitened_input_basis(W - C, prepared.total, rank)
    objective = None
    for _ in range(max(1, iters)):
        R = W - C
        if shared == "out":
            U, V_e = _principal_basis(R, rank, "out", prepared.M)
            UVM = torch.einsum("ok,eki->oi", U[0], V_e.mT @ prepared.M)  # sum_e U V_e^T M_e
        else:
            U_e, V = _basis_in_step(R, prepared.M, V, solver_iters)
            UVM = torch.einsum("eok,eki->oi", U_e, V.mT @ prepared.M)  # sum_e U_e V^T M_e
        C = prepared.solve(prepared.target - UVM)
        if tol > 0:
            UV = U @ V_e.mT if shared == "out" else U_e @ V.mT
            objective, previous = _squared_error(W - C - UV, prepared.M), objective
            if _converged(previous, objective, tol):
                break
    U, V = (U, V_e) if shared == "out" else (U_e, V.unsqueeze(0))
    U, V = _balance_shared(U, V)
    return {"core": C, "u": U, "v": V}
