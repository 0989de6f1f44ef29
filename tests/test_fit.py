"""The fit's building blocks against plain reference computations, and the methods against each other."""

import itertools

import pytest
import torch

from conftest import experts_like, metrics_like
from moe_compress import fit
from moe_compress.experts import wrapped_weights


def truncation(target: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-r approximation of each matrix of `target` in ||.||_F, by SVD."""
    U, S, Vh = torch.linalg.svd(target, full_matrices=False)
    return (U[..., :rank] * S[..., None, :rank]) @ Vh[..., :rank, :]


def metric_objective(D: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """sum_e tr(D_e M_e D_e^T), written out."""
    return sum(torch.trace(D[e] @ M[e] @ D[e].T) for e in range(D.shape[0]))


def dense(factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """What a fit's factors represent, wrapped or additive (delta): [E, out, in]."""
    if "u" in factors:
        return factors["core"] + factors["u"] @ factors["v"].mT
    return wrapped_weights(**factors)


def metric_kron_solution(W, M, A, B, P, Q):
    """Plain reference for the core: least squares over all experts of ||(W_e - S_e C T_e) L_e||, M_e = L_e L_e^T,
    with vec(S C T L) = ((T L)^T kron S) vec(C) (column-major vec)."""
    E, out_f, in_f = W.shape
    S, T = torch.eye(out_f).double() + A @ B.mT, torch.eye(in_f).double() + P @ Q.mT
    L = torch.linalg.cholesky(M)
    system = torch.cat([torch.kron((T[e] @ L[e]).T.contiguous(), S[e]) for e in range(E)])
    rhs = torch.cat([(W[e] @ L[e]).T.reshape(-1) for e in range(E)])
    return torch.linalg.lstsq(system, rhs.unsqueeze(1)).solution.reshape(in_f, out_f).T


@pytest.mark.parametrize("m,n", [(12, 20), (20, 12)])
def test_reduced_rank_fit_is_the_svd_optimum(m, n):
    g = torch.Generator().manual_seed(1)
    R = torch.randn(3, m, n, generator=g, dtype=torch.float64)
    M = torch.randn(3, m, n, generator=g, dtype=torch.float64)
    A, B = fit.reduced_rank_fit(R, M, rank=4)
    # Plain reference: with M = U S V^T, the optimum of ||R - X M|| over rank-4 X is the rank-4 truncation of R V V^T.
    _, _, Vh = torch.linalg.svd(M, full_matrices=False)
    target = R @ Vh.mT @ Vh
    U_t, S_t, Vh_t = torch.linalg.svd(target, full_matrices=False)
    best = (U_t[..., :4] * S_t[..., None, :4]) @ Vh_t[..., :4, :]
    # The ridge on 1/S (fit.RIDGE) moves the product slightly off the optimum and the objective by far less
    assert torch.allclose(A @ B.mT @ M, best, atol=5e-3)
    objective, optimum = (R - A @ B.mT @ M).norm(), (R - best).norm()
    assert optimum <= objective <= optimum * (1 + 1e-6)
    assert torch.allclose(A.norm(dim=-2), B.norm(dim=-2), rtol=1e-6)  # balanced factors


@pytest.mark.parametrize("m,n", [(12, 20), (20, 12)])
@pytest.mark.parametrize("sides", ["left", "right", "both"])
def test_reduced_rank_fit_in_a_metric_is_the_whitened_optimum(m, n, sides, monkeypatch):
    monkeypatch.setattr(fit, "RIDGE", 0.0)  # the algebra exactly: the ridge drops the weakest whitened directions
    g = torch.Generator().manual_seed(3)
    R = torch.randn(3, m, n, generator=g, dtype=torch.float64)
    M = torch.randn(3, m, n, generator=g, dtype=torch.float64)
    N_l = metrics_like(3, m, seed=4, dtype=torch.float64) if sides in ("left", "both") else torch.eye(m).double()
    N_r = metrics_like(3, n, seed=5, dtype=torch.float64) if sides in ("right", "both") else torch.eye(n).double()
    A, B = fit.reduced_rank_fit(R, M, 4, left=N_l if sides != "right" else None, right=N_r if sides != "left" else None)
    # Plain reference with explicit Cholesky factors: with A~ = S^T A (N_l = S S^T) and N_r = L L^T, the problem is
    # the plain one in R~ = S^T R L and M~ = M L; its optimum truncates R~ projected on the row space of M~
    S, L = torch.linalg.cholesky(N_l), torch.linalg.cholesky(N_r)
    _, _, Vh = torch.linalg.svd(M @ L, full_matrices=False)
    optimum = (S.mT @ R @ L - truncation(S.mT @ R @ L @ Vh.mT @ Vh, 4)).norm()
    objective = (S.mT @ (R - A @ B.mT @ M) @ L).norm()
    assert optimum <= objective * (1 + 1e-12) and objective <= optimum * (1 + 1e-9)


def test_core_refit_solves_the_normal_equations():
    W = experts_like(E=3, out_f=4, in_f=5, rank=2).double()
    g = torch.Generator().manual_seed(2)
    A, B = (0.5 * torch.randn(3, 4, 2, generator=g, dtype=torch.float64) for _ in range(2))
    P, Q = (0.5 * torch.randn(3, 5, 2, generator=g, dtype=torch.float64) for _ in range(2))
    C = fit.refit_core(W, W.mean(0, keepdim=True), A, B, P, Q, iters=40)
    # Plain reference: vec(L C R) = (R^T kron L) vec(C) with column-major vec; least squares over all experts.
    eye = lambda k: torch.eye(k, dtype=torch.float64)
    L, Rt = eye(4) + A @ B.mT, eye(5) + P @ Q.mT
    system = torch.cat([torch.kron(Rt[e].T.contiguous(), L[e]) for e in range(3)])
    rhs = torch.cat([W[e].T.reshape(-1) for e in range(3)])
    solution = torch.linalg.lstsq(system, rhs.unsqueeze(1)).solution.reshape(5, 4).T
    assert torch.allclose(C[0], solution, atol=1e-8)


def test_delta_one_round_is_truncated_svd_of_the_deviations():
    W = experts_like()
    factors = fit.fit_delta(W, rank=2, iters=1)
    D = W - W.mean(0, keepdim=True)
    for e in range(W.shape[0]):
        U, S, Vh = torch.linalg.svd(D[e])
        expected = (U[:, :4] * S[:4]) @ Vh[:4]
        assert torch.allclose(factors["u"][e] @ factors["v"][e].T, expected, atol=1e-5)


def test_als_reaches_lower_error_than_the_seed_recipe():
    W = experts_like()
    seed_recipe = fit.fit_adam(W, steps=300, lr=1e-3, init=fit.seed_init(W, 3, seed=0))
    als = fit.fit_als(W, 3, iters=3)
    error = lambda factors: fit.relative_error(W, wrapped_weights(**factors))
    assert error(als) < error(seed_recipe)
    assert error(fit.fit_adam(W, steps=50, lr=1e-3, init=als)) < error(als)  # the polish helps


def test_als_first_side_is_the_best_one_sided_wrapper_around_the_mean():
    W = experts_like(E=4, out_f=12, in_f=20, rank=2).double()
    seen = []
    fit.fit_als(W, 2, iters=1, callback=seen.append)
    first = seen[0]
    assert first["u_out"] is None and first["v_out"] is None  # the input side goes first when out <= in
    # Plain reference: W_e - C = C (P Q^T) is best fitted by the rank-2 truncation of D_e projected on range(C)
    C, D = W.mean(0), W - W.mean(0)
    U_c, _, _ = torch.linalg.svd(C, full_matrices=False)
    U, S, Vh = torch.linalg.svd(U_c @ U_c.T @ D, full_matrices=False)
    best = C + (U[..., :2] * S[..., None, :2]) @ Vh[..., :2, :]
    fitted = wrapped_weights(**first)
    assert torch.allclose(fitted, best, atol=1e-4)  # the ridge (fit.RIDGE) moves it slightly, the objective less
    assert (W - best).norm() <= (W - fitted).norm() <= (W - best).norm() * (1 + 1e-6)
    assert len(seen) == 3  # input side, output side, core refit


def test_als_error_falls_with_rank_and_ends_below_a_measured_5_percent_at_the_generating_rank_in_three_rounds():
    W = experts_like(noise=0.0)  # exactly of the wrapped form at rank 3
    errors = [fit.relative_error(W, wrapped_weights(**fit.fit_als(W, r, iters=3))) for r in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]
    # empirical, not zero: three rounds leave 0.0416 (measured) of a structure rank 3 represents exactly
    assert errors[2] < 0.05


def test_seed_recipe_is_seeded():
    W = experts_like()
    first = fit.fit_adam(W, steps=5, lr=1e-3, init=fit.seed_init(W, 2, seed=7))
    again = fit.fit_adam(W, steps=5, lr=1e-3, init=fit.seed_init(W, 2, seed=7))
    other = fit.fit_adam(W, steps=5, lr=1e-3, init=fit.seed_init(W, 2, seed=8))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["v_in"], other["v_in"])


def test_core_refit_in_a_metric_solves_its_normal_equations():
    W = experts_like(E=3, out_f=4, in_f=5, rank=2).double()
    M = metrics_like(3, 5, tokens=50, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    A, B = (0.5 * torch.randn(3, 4, 2, generator=g, dtype=torch.float64) for _ in range(2))
    P, Q = (0.5 * torch.randn(3, 5, 2, generator=g, dtype=torch.float64) for _ in range(2))
    C = fit.refit_core(W, W.mean(0, keepdim=True), A, B, P, Q, iters=40, metric=fit.Metric.of(W, M))
    assert torch.allclose(C[0], metric_kron_solution(W, M, A, B, P, Q), atol=1e-8)


def test_core_starts_at_regmean_the_optimum_for_identity_wrappers():
    W, M = experts_like(E=4, out_f=6, in_f=7).double(), metrics_like(4, 7, dtype=torch.float64)
    start = fit.fit_als(W, 2, iters=0, metric=M)
    zeros = lambda n: torch.zeros(4, n, 2, dtype=torch.float64)
    assert torch.allclose(start["core"][0], metric_kron_solution(W, M, zeros(6), zeros(6), zeros(7), zeros(7)),
                          atol=1e-10)
    assert all(not start[k].any() for k in ("u_out", "v_out", "u_in", "v_in"))


@pytest.mark.parametrize("out_f,in_f", [(12, 20), (20, 12)])
def test_identity_metrics_reproduce_the_data_free_fits(out_f, in_f):
    W = experts_like(E=4, out_f=out_f, in_f=in_f, rank=2).double()
    identity = torch.eye(in_f, dtype=torch.float64).expand(4, in_f, in_f)
    # CG run to convergence: with a metric it is preconditioned, so after a few steps its core is a different one
    plain, whitened = fit.fit_als(W, 2, core_iters=100), fit.fit_als(W, 2, core_iters=100, metric=identity)
    assert all(torch.allclose(plain[k], whitened[k], atol=1e-6) for k in plain)
    assert torch.allclose(dense(fit.fit_delta(W, 2)), dense(fit.fit_delta(W, 2, metric=identity)), atol=1e-6)


@pytest.mark.parametrize("out_f,in_f", [(12, 20), (20, 12)])
def test_als_first_side_in_a_metric_is_the_best_one_sided_wrapper_around_regmean(out_f, in_f, monkeypatch):
    monkeypatch.setattr(fit, "RIDGE", 0.0)
    W, M = experts_like(E=4, out_f=out_f, in_f=in_f, rank=2).double(), metrics_like(4, in_f, dtype=torch.float64)
    seen = []
    fit.fit_als(W, 2, iters=1, callback=seen.append, metric=M)
    first, C = seen[0], seen[0]["core"]
    # Plain reference with L_e = chol(M_e): the input side (out <= in) reaches C P Q^T L = any rank-2 matrix with
    # columns in range(C); the output side A B^T C L = any rank-2 matrix with rows in the row space of C L_e
    L = torch.linalg.cholesky(M)
    RL = (W - C) @ L
    if out_f <= in_f:
        U_c = torch.linalg.svd(C, full_matrices=False)[0]
        target = U_c @ U_c.mT @ RL
    else:
        Vh_c = torch.linalg.svd(C @ L, full_matrices=False)[2]
        target = RL @ Vh_c.mT @ Vh_c
    best = C + truncation(target, 2) @ torch.linalg.inv(L)
    optimum, objective = metric_objective(W - best, M), metric_objective(W - wrapped_weights(**first), M)
    assert optimum <= objective * (1 + 1e-12) and objective <= optimum * (1 + 1e-9)


@pytest.mark.parametrize("out_f,in_f", [(12, 20), (20, 12)])
def test_whitened_delta_is_svd_llm_and_its_core_the_closed_form(out_f, in_f):
    W, M = experts_like(E=4, out_f=out_f, in_f=in_f).double(), metrics_like(4, in_f, dtype=torch.float64)
    one, two = fit.fit_delta(W, 2, iters=1, metric=M), fit.fit_delta(W, 2, iters=2, metric=M)
    L = torch.linalg.cholesky(M)
    # SVD-LLM: [D_e L_e]_r L_e^-1, D_e = W_e - C
    assert torch.allclose(one["u"] @ one["v"].mT, truncation((W - one["core"]) @ L, 4) @ torch.linalg.inv(L),
                          atol=1e-8)
    # the core refit: least squares of sum_e ||(W_e - U_e V_e^T - C) L_e|| over C
    zeros = lambda n: torch.zeros(4, n, 1, dtype=torch.float64)
    residual = W - one["u"] @ one["v"].mT
    assert torch.allclose(two["core"][0], metric_kron_solution(residual, M, zeros(out_f), zeros(out_f), zeros(in_f),
                                                                zeros(in_f)), atol=1e-10)
    assert torch.allclose(two["u"] @ two["v"].mT, truncation((W - two["core"]) @ L, 4) @ torch.linalg.inv(L),
                          atol=1e-8)


def test_whitened_fits_trade_weight_error_for_metric_error():
    W, M = experts_like(), metrics_like(spread=2.0)
    for method in (lambda **kw: fit.fit_als(W, 3, **kw), lambda **kw: fit.fit_delta(W, 3, **kw)):
        plain, whitened = dense(method()), dense(method(metric=M))
        assert fit.relative_error(W, whitened, M) < 0.8 * fit.relative_error(W, plain, M)
        assert fit.relative_error(W, whitened) > fit.relative_error(W, plain)


@pytest.mark.parametrize("out_f,in_f", [(12, 20), (20, 12)])
@pytest.mark.parametrize("damping", [1e-6, 1e-9])  # 1e-9: below fp32's rounding, M is numerically indefinite
def test_badly_conditioned_metrics_give_finite_fits(out_f, in_f, damping):
    """Rarely routed experts: fp32 Grams of 3 tokens for 12 or 20 inputs, channel scales over 10^3, barely damped."""
    W = experts_like(E=4, out_f=out_f, in_f=in_f)
    g = torch.Generator().manual_seed(5)
    X = torch.randn(4, 3, in_f, generator=g) * 10 ** (3 * torch.rand(4, 1, in_f, generator=g))
    M = X.mT @ X
    M = M + damping * M.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(in_f)
    assert torch.linalg.cond(M.double()).min() > 1e6
    als, delta = fit.fit_als(W, 2, metric=M, tol=1e-3), fit.fit_delta(W, 2, metric=M)
    assert all(torch.isfinite(t).all() for t in [*als.values(), *delta.values()])
    assert fit.relative_error(W, dense(als), M) < 0.1 and fit.relative_error(W, dense(delta), M) < 0.1


@pytest.mark.parametrize("with_metric", [False, True])
def test_tol_stops_early_and_rounds_never_increase_the_objective(with_metric):
    W = experts_like(noise=0.5)
    M = metrics_like() if with_metric else None
    objective = lambda factors: fit.relative_error(W, wrapped_weights(**factors), M) ** 2
    start = objective(fit.fit_als(W, 2, iters=0, metric=M))

    def rounds(tol: float) -> tuple[int, list[float]]:
        seen, objectives = [], [start]  # the objective at the start and after each round (its core refit)
        def callback(factors):
            seen.append(factors)
            if len(seen) % 3 == 0:
                objectives.append(objective(factors))
        fit.fit_als(W, 2, iters=8, callback=callback, metric=M, tol=tol)
        return len(seen), objectives

    calls, objectives = rounds(tol=0.0)
    assert calls == 3 * 8
    assert all(b <= a * (1 + 1e-5) for a, b in itertools.pairwise(objectives))
    calls, objectives = rounds(tol=5e-2)
    gains = [1 - b / a for a, b in itertools.pairwise(objectives)]
    assert calls < 3 * 8 and calls == 3 * len(gains)
    assert all(gain > 5e-2 for gain in gains[:-1]) and gains[-1] <= 5e-2  # it stops at the first small gain


def test_a_metric_of_the_wrong_shape_is_refused_before_any_work():
    W = experts_like()
    with pytest.raises(ValueError, match=r"one input Gram per expert, \[E, in, in\] = \[6, 40, 40\]"):
        fit.fit_als(W, 2, metric=metrics_like(E=6, in_f=24))
    with pytest.raises(ValueError, match="tol=-0.1 is negative"):
        fit.fit_als(W, 2, tol=-0.1)


@pytest.mark.parametrize("shared", ["in", "out"])
def test_data_free_basis_is_the_principal_components_of_the_deviations(shared):
    W = experts_like().double()
    k = 5
    factors = fit.fit_basis(W, k, shared)
    R = W - W.mean(0, keepdim=True)
    # reference: the shared side's basis is the top-k left singular vectors of the deviations stacked along the other
    stacked = torch.cat(list(R), 0) if shared == "in" else torch.cat(list(R), 1)  # [E*out, in] or [out, E*in]
    P = torch.linalg.svd(stacked.T if shared == "in" else stacked, full_matrices=False)[0][:, :k]
    expected = R @ P @ P.T if shared == "in" else P @ P.T @ R
    assert factors["u" if shared == "out" else "v"].shape[0] == 1
    assert torch.allclose(dense(factors), W.mean(0, keepdim=True) + expected, atol=1e-9)


@pytest.mark.parametrize("shared", ["in", "out"])
def test_basis_in_a_metric_lowers_its_objective_every_round_and_identity_reproduces_data_free(shared):
    W, M = experts_like().double(), metrics_like().double()
    objectives = [metric_objective(W - dense(fit.fit_basis(W, 6, shared, iters, metric=M)), M).item()
                  for iters in (1, 2, 3, 5)]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(objectives, objectives[1:])), objectives
    identity = torch.eye(W.shape[-1], dtype=W.dtype).expand(W.shape[0], -1, -1)
    assert torch.allclose(dense(fit.fit_basis(W, 6, shared, 2, metric=identity)), dense(fit.fit_basis(W, 6, shared)),
                          atol=1e-8)


def test_shared_output_basis_in_a_metric_is_the_best_around_its_core():
    """Given the core, no other shared output basis of k columns does better in the metric (with an orthonormal
    basis Q the best V_e^T is Q^T R_e, whatever M_e): the fit equals the eigenvector solution and beats random bases."""
    W, M = experts_like().double(), metrics_like().double()
    factors = fit.fit_basis(W, 4, "out", iters=1, metric=M)
    R = W - factors["core"]
    fitted = metric_objective(W - dense(factors), M)
    U = torch.linalg.eigh(sum(R[e] @ M[e] @ R[e].T for e in range(W.shape[0])))[1][:, -4:]
    assert torch.allclose(fitted, metric_objective(R - U @ U.T @ R, M), rtol=1e-9)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        Q = torch.linalg.qr(torch.randn(W.shape[1], 4, generator=g, dtype=W.dtype))[0]
        assert metric_objective(R - Q @ Q.T @ R, M) > fitted
