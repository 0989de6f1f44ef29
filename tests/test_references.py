"""Plain references, written out, for what other tests check only indirectly: the calibrated input-basis step of
fit_basis, error_curve, HC-SMoE's mean outputs, the down projection's Grams on gpt_oss, and the chunked metric error.

Each reference is the formula in plain torch, in fp64 (an SVD, a solve, a loop over tokens), never the function under
test called another way. Shapes: E experts, out x in a projection's matrices, k basis width, r rank, G groups,
T tokens, K active experts per token, H hidden, F expert width.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import KernelCalls, tiny_model, token_ids

from moe_compress import find_experts, fit
from moe_compress.baselines import MeanOutputs
from moe_compress.calibration.grams import ExpertGrams
from moe_compress.calibration.observe import observe
from moe_compress.compression.allocation import error_curve


def expert_weights(E: int = 4, out_f: int = 5, in_f: int = 6, seed: int = 0) -> torch.Tensor:
    """A shared part and per-expert deviations of a tenth of its size: [E, out, in], fp64."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, out_f, in_f, generator=g, dtype=torch.float64)
    return shared + 0.1 * torch.randn(E, out_f, in_f, generator=g, dtype=torch.float64)


def metrics(E: int = 4, n: int = 6, seed: int = 1) -> torch.Tensor:
    """Input Grams X_e^T X_e of 40 tokens whose channel scales span 100x and differ per expert: [E, n, n], SPD."""
    g = torch.Generator().manual_seed(seed)
    scales = 10 ** (2 * torch.rand(E, 1, n, generator=g, dtype=torch.float64) - 1)
    X = torch.randn(E, 40, n, generator=g, dtype=torch.float64) * scales
    return X.mT @ X


def objective(W: torch.Tensor, C: torch.Tensor, U: torch.Tensor, V: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """sum_e tr((W_e - C - U_e V^T) M_e (W_e - C - U_e V^T)^T), V [in, k] shared, one expert at a time."""
    total = 0
    for e in range(W.shape[0]):
        D = W[e] - C - U[e] @ V.T
        total = total + torch.trace(D @ M[e] @ D.T)
    return total


def core_given(W: torch.Tensor, low_rank: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """The C that minimises sum_e tr((W_e - C - X_e) M_e (...)^T) for fixed X_e = low_rank[e]: setting the gradient
    -2 sum_e (W_e - C - X_e) M_e to zero, C (sum_e M_e) = sum_e (W_e - X_e) M_e."""
    rhs = sum((W[e] - low_rank[e]) @ M[e] for e in range(W.shape[0]))
    return torch.linalg.solve(M.sum(0), rhs.T).T  # sum_e M_e is symmetric


def projector(V: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector on the columns of V [n, k]: it names a subspace whatever its basis."""
    return V @ torch.linalg.solve(V.T @ V, V.T)


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).norm() / expected.norm()).item()


# fp64 references against fp64 fits: both sides are closed forms (solves, SVDs, eigendecompositions) of
# well-conditioned problems (the metrics' condition numbers are at most 6e3), each good to about 1e-12 (fp64's unit
# roundoff 1e-16 times the condition number); 1e-9 leaves a wide margin and is far below what a wrong step gives (a
# different least-squares problem, a missing metric, a wrong core: off by 1e-3 to order 1).
FP64_TOLERANCE = 1e-9


def test_calibrated_input_basis_start_and_U_step_are_the_documented_least_squares():
    """fit_basis(shared="in") in a metric starts from the principal basis of the whitened deviations, mapped back by
    L^-T (L L^T the experts' mean metric); given V, each U_e = (W_e - C) M_e V (V^T M_e V)^-1 around the RegMean core;
    then C is refit in closed form. With no conjugate-gradient step, V stays at its start and all three show."""
    W, M = expert_weights(), metrics()
    E, k = W.shape[0], 2
    fitted = fit.fit_basis(W, k, "in", iters=1, metric=M, solver_iters=0)
    U, V, C = fitted["u"], fitted["v"][0], fitted["core"][0]
    C0 = core_given(W, torch.zeros_like(W), M)  # RegMean: (sum_e W_e M_e)(sum_e M_e)^-1
    L = torch.linalg.cholesky(M.mean(0))
    whitened = torch.cat([(W[e] - C0) @ L for e in range(E)])  # [E*out, in]: the deviations, stacked, whitened
    start = torch.linalg.solve(L.T, torch.linalg.svd(whitened, full_matrices=False).Vh[:k].T)  # L^-T V_w
    assert relative(projector(V), projector(start)) < FP64_TOLERANCE
    for e in range(E):  # the least-squares U_e for this V (a rescaled V rescales U_e inversely, so the fit's balancing
        # of their columns leaves the identity intact)
        expected = (W[e] - C0) @ M[e] @ V @ torch.linalg.inv(V.T @ M[e] @ V)
        assert relative(U[e], expected) < FP64_TOLERANCE, e
    assert relative(C, core_given(W, U @ V.T, M)) < FP64_TOLERANCE


def test_calibrated_input_basis_V_step_is_the_minimiser_of_the_objective():
    """Given U (and the RegMean core the step ran around), the objective is a quadratic in V's in*k entries: its
    minimiser, from the Hessian and gradient of the plain objective by autograd, is what conjugate gradient on the
    normal equations converges to. In exact arithmetic it gets there in in*k = 12 steps; in fp64 rounding delays it
    (the preconditioned system's condition number here is about 800): measured 4e-4 away after 12 steps, 2e-8 after
    13, 6e-15 after 24. So 2*in*k steps."""
    W, M = expert_weights(), metrics()
    in_f, k = W.shape[2], 2
    fitted = fit.fit_basis(W, k, "in", iters=1, metric=M, solver_iters=2 * in_f * k)
    U, V, C = fitted["u"], fitted["v"][0], fitted["core"][0]
    C0 = core_given(W, torch.zeros_like(W), M)

    def f(v: torch.Tensor) -> torch.Tensor:
        return objective(W, C0, U, v.view(in_f, k), M)

    zero = torch.zeros(in_f * k, dtype=W.dtype)
    hessian, gradient = torch.autograd.functional.hessian(f, zero), torch.autograd.functional.jacobian(f, zero)
    minimiser = -torch.linalg.solve(hessian, gradient)
    assert relative(V.reshape(-1), minimiser) < FP64_TOLERANCE
    assert relative(C, core_given(W, U @ V.T, M)) < FP64_TOLERANCE  # then the core, refit around the new U V^T


def first_cores(W: torch.Tensor, groups: torch.Tensor, M: torch.Tensor | None) -> torch.Tensor:
    """Each expert's group's mean, or RegMean (sum W_e M_e)(sum M_e)^-1 over the group in a metric: [E, out, in]."""
    cores = torch.empty_like(W)
    for g in groups.unique().tolist():
        members = (groups == g).nonzero().flatten().tolist()
        if M is None:
            cores[members] = sum(W[e] for e in members) / len(members)
        else:
            cores[members] = core_given(W[members], torch.zeros_like(W[members]), M[members])
    return cores


def roots(M: torch.Tensor | None, E: int, n: int) -> torch.Tensor:
    """L_e with M_e = L_e L_e^T (the identity without a metric): [E, n, n]."""
    return torch.eye(n, dtype=torch.float64).expand(E, n, n) if M is None else torch.linalg.cholesky(M)


def best_correction_error(R: torch.Tensor, M: torch.Tensor | None, rank: int) -> torch.Tensor:
    """sum_e of what the best rank-`rank` correction X_e of R_e leaves, tr((R_e - X_e) M_e (R_e - X_e)^T): with
    M_e = L_e L_e^T that is ||R_e L_e - X_e L_e||_F^2, least for X_e L_e the truncated SVD of R_e L_e."""
    E, _, in_f = R.shape
    L = roots(M, E, in_f)
    total = 0
    for e in range(E):
        U, S, Vh = torch.linalg.svd(R[e] @ L[e], full_matrices=False)
        X = (U[:, :rank] * S[:rank]) @ Vh[:rank] @ torch.linalg.inv(L[e])
        D = R[e] - X
        total = total + torch.trace(D @ L[e] @ L[e].T @ D.T)
    return total


def best_basis_error(R: torch.Tensor, M: torch.Tensor | None, k: int, side: str) -> torch.Tensor:
    """What the best k-column basis shared by the experts leaves of the deviations. Input side: one L for all
    experts (the mean metric's root; the per-expert problem has no closed form), the top right singular vectors of
    the stacked R_e L. Output side: the top left singular vectors of [R_1 L_1, ..., R_E L_E], exact per metric."""
    E, _, in_f = R.shape
    if side == "in":
        L = roots(None if M is None else M.mean(0, keepdim=True), 1, in_f)[0]
        Z = torch.cat([R[e] @ L for e in range(E)])  # [E*out, in]
        P = torch.linalg.svd(Z, full_matrices=False).Vh[:k]  # [k, in]
        return (Z - Z @ P.T @ P).square().sum()
    L = roots(M, E, in_f)
    Z = torch.cat([R[e] @ L[e] for e in range(E)], 1)  # [out, E*in]
    Q = torch.linalg.svd(Z, full_matrices=False).U[:, :k]  # [out, k]
    return (Z - Q @ Q.T @ Z).square().sum()


def metric_norm(W: torch.Tensor, M: torch.Tensor | None) -> torch.Tensor:
    """sum_e tr(W_e M_e W_e^T), ||W||_F^2 without a metric."""
    E, _, in_f = W.shape
    L = roots(M, E, in_f)
    return sum((W[e] @ L[e]).square().sum() for e in range(E))


CURVES = [  # form, projection, (out, in), calibrated, groups (None: one)
    ("wrapped", "up", (5, 7), False, None),
    ("wrapped", "gate", (5, 7), True, [0, 1, 2, 0, 1, 2]),
    ("wrapped", "down", (7, 5), False, [0, 0, 1, 1, 0, 1]),
    ("delta", "down", (7, 5), True, [1, 0, 1, 0, 0, 1]),
    ("basis", "up", (5, 7), True, None),
    ("basis", "down", (7, 5), True, None),
    ("basis", "gate", (7, 5), False, None),
]


@pytest.mark.parametrize("form, projection, shape, calibrated, groups", CURVES)
def test_error_curve_is_the_best_correction_at_each_rank(form, projection, shape, calibrated, groups):
    """At every rank (beyond full rank too, where nothing is left), the curve is the residual around each group's
    first core after the best rank-2r per-expert correction (wrapped, delta), or after the best shared basis of
    k = r columns (basis), relative to the weights' own norm, in the metric when calibrated; and the parameters it
    stores are G*out*in cores plus, per rank, 2r(out+in) per expert (wrapped, delta) or the shared side once and the
    other per expert (basis)."""
    E, (out_f, in_f), max_rank = 6, shape, 8  # 2r and k reach past min(out, in) and max(out, in) = 7
    W = expert_weights(E, out_f, in_f, seed=2)
    M = metrics(E, in_f, seed=3) if calibrated else None
    labels = None if groups is None else torch.tensor(groups)
    curve = error_curve(W, form, projection, max_rank, labels, M)
    R = W - first_cores(W, torch.zeros(E, dtype=torch.long) if labels is None else labels, M)
    side = "out" if projection == "down" else "in"
    # the shared input basis is measured in the experts' mean metric, the estimate of each one's it is fitted in
    norm_metric = M.mean(0, keepdim=True).expand_as(M) if form == "basis" and side == "in" and calibrated else M
    total = metric_norm(W, norm_metric)
    expected = [(best_basis_error(R, M, r, side) if form == "basis" else best_correction_error(R, M, 2 * r)) / total
                for r in range(max_rank + 1)]
    assert len(curve.errors) == max_rank + 1
    assert curve.errors == pytest.approx([x.item() for x in expected], rel=FP64_TOLERANCE, abs=1e-12)
    assert curve.errors[-1] == pytest.approx(0, abs=1e-12)  # a full-rank correction or basis leaves nothing
    num_cores = 1 if groups is None else len(set(groups))
    assert curve.base == num_cores * out_f * in_f
    if form == "basis":
        shared_side, own = (in_f, out_f) if side == "in" else (out_f, in_f)
        assert curve.step == shared_side + E * own
    else:
        assert curve.step == E * 2 * (out_f + in_f)


def calibration_model(model_type: str):
    """A tiny model whose experts have nonzero biases (gpt_oss) and weights large enough that gpt_oss's gating clamps:
    with a limit of 1 and pre-activations of about +-2, some gate values pass the limit and some up values pass +-1
    (at the default limit of 7 and the initial weights nothing is ever clamped, and biases start at zero)."""
    model = tiny_model(model_type, swiglu_limit=1.0)  # models without the setting ignore it
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, experts in find_experts(model):
            for p in experts.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 3 else 0.5))
    return model


def plain_expert(experts, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate pre-activation, up pre-activation, h) of expert e on one token x [H], in fp64, from the raw parameters.
    gpt_oss: [gate | up] interleaved columns of x W + b (W stored [H, 2F]), gate clamped above at the limit, up to
    +-limit, h = (up + 1) * gate * sigmoid(alpha gate). qwen3_moe: [gate; up] rows of W x, h = silu(gate) * up."""
    x = x.double()
    if hasattr(experts, "limit"):  # gpt_oss
        gate_up = x @ experts.gate_up_proj[e].double() + experts.gate_up_proj_bias[e].double()
        gate, up = gate_up[0::2], gate_up[1::2]
        clamped_gate, clamped_up = gate.clamp(max=experts.limit), up.clamp(-experts.limit, experts.limit)
        return gate, up, (clamped_up + 1) * clamped_gate * torch.sigmoid(experts.alpha * clamped_gate)
    F_ = experts.down_proj.shape[2]
    gate_up = experts.gate_up_proj[e].double() @ x
    gate, up = gate_up[:F_], gate_up[F_:]
    return gate, up, F.silu(gate) * up


def plain_output(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """f_e(x) [H] in fp64: down h (+ b) from plain_expert's h; gpt_oss stores down as [F, H]."""
    h = plain_expert(experts, e, x)[2]
    if hasattr(experts, "limit"):
        return h @ experts.down_proj[e].double() + experts.down_proj_bias[e].double()
    return experts.down_proj[e].double() @ h


def recording(observer: type) -> type:
    """The observer class, also keeping a copy of every routed input it sees: (hidden [T, H], index, weights)."""

    class Recording(observer):
        def __call__(self, experts, hidden_states, top_k_index, top_k_weights) -> None:
            routed = self.__dict__.setdefault("routed", [])
            routed.append((hidden_states.reshape(-1, hidden_states.shape[-1]).clone(), top_k_index.clone(),
                         top_k_weights.clone()))
            super().__call__(experts, hidden_states, top_k_index, top_k_weights)

    return Recording


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_hc_smoe_features_are_each_experts_output_averaged_over_all_tokens(model_type):
    """HC-SMoE's feature (baselines.MeanOutputs): mean_e = (1/T) sum over all T calibration tokens, routed to e or
    not, of f_e(x) with weight 1; and the routed-token counts n_e, for the frequency-weighted merge. Three sequences
    in batches of two, so that sums and counts carry over batches."""
    model = calibration_model(model_type)
    stats = observe(model, token_ids(3, 10), recording(MeanOutputs), batch_size=2, progress=False)
    for name, experts in find_experts(model):
        routed = stats[name].routed
        x = torch.cat([hidden for hidden, _, _ in routed])  # [T, H]
        index = torch.cat([top_k_index for _, top_k_index, _ in routed])
        E = experts.num_experts
        with torch.no_grad():
            expected = torch.stack([sum(plain_output(experts, e, x_t) for x_t in x) / x.shape[0] for e in range(E)])
        assert len(routed) == 2 and x.shape[0] == 30
        # the module runs in fp32 (unit roundoff 6e-8) on up to 64-term dot products, summed in fp64: ~1e-6 at most
        assert relative(stats[name].mean, expected) < 1e-5, relative(stats[name].mean, expected)
        assert torch.equal(stats[name].tokens, torch.bincount(index.flatten(), minlength=E))


def test_down_projection_grams_on_gpt_oss_follow_its_biases_and_clamped_gating():
    """ExpertGrams on gpt_oss: for every routed (token, expert) pair with routing weight g, M'_e += g^2 h h^T with h
    the model's own clamped gating of (x W_gate + b_gate, x W_up + b_up), and M_e += g^2 x x^T; on the routing that
    `observe` sees in the real model."""
    model = calibration_model("gpt_oss")
    stats = observe(model, token_ids(3, 10), recording(ExpertGrams), batch_size=2, progress=False)
    for name, experts in find_experts(model):
        grams = stats[name]
        H, F_, E = experts.hidden_size, experts.intermediate_size, experts.num_experts
        M, M_down = torch.zeros(E, H, H, dtype=torch.float64), torch.zeros(E, F_, F_, dtype=torch.float64)
        count = torch.zeros(E, dtype=torch.long)
        gates, ups = [], []
        with torch.no_grad():
            for hidden, top_k_index, top_k_weights in grams.routed:
                for t in range(hidden.shape[0]):
                    for slot in range(top_k_index.shape[1]):
                        e, g, x = top_k_index[t, slot].item(), top_k_weights[t, slot].double(), hidden[t].double()
                        gate, up, h = plain_expert(experts, e, x)
                        M[e] += g**2 * torch.outer(x, x)
                        M_down[e] += g**2 * torch.outer(h, h)
                        count[e] += 1
                        gates.append(gate)
                        ups.append(up)
        gates, ups = torch.cat(gates), torch.cat(ups)
        # the clamps were reached, so a Gram that skipped them (or the biases, or the interleaving) would differ
        assert (gates > experts.limit).float().mean() > 0.05 and (ups.abs() > experts.limit).float().mean() > 0.05
        assert torch.equal(grams.tokens, count)
        # fp32 accumulation (unit roundoff 6e-8) of 7 to 24 outer products per expert, against fp64: ~1e-6 at most
        assert relative(grams.gram("down"), M_down) < 1e-5, relative(grams.gram("down"), M_down)
        assert relative(grams.gram("gate"), M) < 1e-5, relative(grams.gram("gate"), M)


def test_metric_error_summed_in_several_chunks_is_the_plain_sum(monkeypatch):
    """relative_error in a metric, sqrt(sum_e tr(D_e M_e D_e^T) / sum_e tr(W_e M_e W_e^T)), with the per-expert
    products taken two experts at a time: 5 experts make chunks of 2, 2 and 1 for each sum."""
    E, out_f, in_f = 5, 3, 4
    W, W_hat = expert_weights(E, out_f, in_f, seed=4), expert_weights(E, out_f, in_f, seed=5)
    M = metrics(E, in_f, seed=6)
    monkeypatch.setattr(fit, "CHUNK_ELEMENTS", 2 * out_f * in_f)
    with KernelCalls() as kernels:
        got = fit.relative_error(W, W_hat, M)
    chunks = [shapes[0][0] for shapes in kernels.shapes[torch.ops.aten.bmm.default]]
    assert chunks == [2, 2, 1, 2, 2, 1]  # the error's sum, then the weights'
    D = W - W_hat
    expected = math.sqrt(torch.einsum("eoi,eij,eoj->", D, M, D) / torch.einsum("eoi,eij,eoj->", W, M, W))
    # fp64 sums of 240 products each, in other orders: about 1e-15 apart
    assert got == pytest.approx(expected, rel=1e-12)
