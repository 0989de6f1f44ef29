"""The fit's building blocks against plain reference computations, and the methods against each other."""

import pytest
import torch

from moe_compress import fit
from moe_compress.experts import wrapped_weights


def experts_like(E=6, out_f=24, in_f=40, rank=3, noise=0.3, seed=0) -> torch.Tensor:
    """A shared part, per-expert wrapper deviations, and unstructured noise: [E, out, in]."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)
    C = randn(1, out_f, in_f) / in_f**0.5
    W = wrapped_weights(C, 0.3 * randn(E, out_f, rank), 0.3 * randn(E, out_f, rank) / out_f**0.5,
                        0.3 * randn(E, in_f, rank), 0.3 * randn(E, in_f, rank) / in_f**0.5)
    return W + noise * randn(E, out_f, in_f) / in_f**0.5


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


def test_als_error_falls_with_rank_and_reaches_zero_at_full_rank():
    W = experts_like(noise=0.0)
    errors = [fit.relative_error(W, wrapped_weights(**fit.fit_als(W, r, iters=3))) for r in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05


def test_seed_recipe_is_seeded():
    W = experts_like()
    first = fit.fit_adam(W, steps=5, lr=1e-3, init=fit.seed_init(W, 2, seed=7))
    again = fit.fit_adam(W, steps=5, lr=1e-3, init=fit.seed_init(W, 2, seed=7))
    other = fit.fit_adam(W, steps=5, lr=1e-3, init=fit.seed_init(W, 2, seed=8))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["v_in"], other["v_in"])
