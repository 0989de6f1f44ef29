"""The fast forward on torch's grouped_mm kernel, forward and backward, against the plain math in fp64.

At rank 3 (the other forward tests) fp32 rows of factors are 12 bytes, which grouped_mm refuses (it wants 16-byte
aligned rows), so those tests, which want no gradient, run the fallback loop. Here the ranks are aligned, or unaligned
with gradients wanted, where the module pads the factors with zeros to aligned sizes (training, as the reconstruction
does), and every test checks that the kernel ran. Reference: each W_e rebuilt by the formula of its form, written
out below, then transformers' own eager experts code on those weights, all in fp64 from the very values the module
holds, so that autograd through both gives the reference gradients of every core, factor, bias and the input.

Shapes: E experts, T tokens, K active experts per token, H hidden.
"""

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import KernelCalls, randomize, shared_spec, tiny_model

from moe_compress import SharedCoreExperts, experts, find_experts
from moe_compress.discovery import join_weights

E, T, K = 8, 48, 2  # 96 (token, expert) pairs: every expert routed, so grouped_mm takes the kernel (it wants > E/2)
FORMS = {"wrapped": "wrapped", "delta": "delta", "basis": "basis",
         "mixed": {"gate": "basis", "up": "basis", "down": "delta"}}
# fp32 at ranks 4 and 8 (16 and 32-byte rows). bf16 at rank 8 only: at rank 4 its rows are 8 bytes, which torch 2.13's
# CPU grouped_mm refuses ("strides should be multiple of 16 bytes"), so the module sends them to the loop, or with
# gradients wanted pads them to 16 bytes (PADDED).
PRECISIONS = [(torch.float32, 4), (torch.float32, 8), (torch.bfloat16, 8)]
PADDED = [(torch.float32, 3), (torch.bfloat16, 4)]  # 12 and 8-byte rows: zero-padded to 16, since gradients are wanted
# Norm-wise relative error against fp64, per tensor. fp32 (unit roundoff 6e-8): the kernel and the reference sum the
# same products in other orders, in dot products of at most 64 terms and a chain of about six products, so a few 1e-7
# (measured <= 4e-7); 1e-5 leaves a margin of 25x. bf16 (unit roundoff 2^-9 = 2e-3): every product and sum of the
# chain rounds its result to bf16, a few roundings of 2e-3 each (measured <= 7e-3, outputs and gradients); 2e-2. A
# dropped or wrong term is far above both: each pair of factors moves the output by 20-60%, and a parameter's
# gradient missing its term is off by about 100%.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Kernel against loop: on CPU (torch 2.13) they agree bit for bit, outputs and gradients (measured); the tolerance
# allows a kernel that sums each expert's products in another order, by a few fp32 roundings or one bf16 ulp (2^-8).
LOOP_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 4e-3}
GROUPED_MM = torch.ops.aten._grouped_mm.default
MODELS = ["qwen3_moe", "gpt_oss"]  # plain SiLU gating; biases, transposed weights, interleaved gate/up, clamped gating


def compressed(model_type: str, form, rank: int, dtype: torch.dtype, device: str = "cpu") -> SharedCoreExperts:
    experts_module = find_experts(tiny_model(model_type, num_experts=E, num_local_experts=E))[0][1]
    shared = randomize(SharedCoreExperts.empty(experts_module, shared_spec(experts_module, form, rank)))
    with torch.no_grad():  # randomize's factors move the output by 1-4% each, not far above bf16's tolerance; 4x
        for name, p in shared.named_parameters():  # makes each pair of them move it by 20-60% (measured)
            if not name.endswith("core"):
                p.mul_(4)
    return shared.to(device, dtype)


def routed_batch(hidden: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    """Hidden states, a routing that reaches every expert, its weights, and a cotangent for the backward."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, hidden, generator=g).to(dtype)
    index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.randn(T, K, generator=g).softmax(-1).to(dtype)
    cotangent = torch.randn(T, hidden, generator=g).to(dtype)  # not ones: a sum's gradient would be one broadcast value
    assert index.unique().numel() == E
    return tuple(t.to(device) for t in (x, index, weights, cotangent))


def plain_weights(proj, p) -> torch.Tensor:
    """W_e [E, out, in] of one projection by its form's formula, from its parameters p[name]."""
    C = p["core"][proj.expert_core.cpu()]
    if proj.form == "wrapped":  # (I + U_out V_out^T) C (I + U_in V_in^T)
        out_f, in_f = proj.shape
        eye_out, eye_in = torch.eye(out_f, dtype=C.dtype), torch.eye(in_f, dtype=C.dtype)
        return (eye_out + p["u_out"] @ p["v_out"].mT) @ C @ (eye_in + p["u_in"] @ p["v_in"].mT)
    return C + p["u"] @ p["v"].mT  # delta C + U_e V_e^T; basis C + U_e V^T or C + U V_e^T (shared factor broadcasts)


def reference(shared: SharedCoreExperts, x, index, weights, cotangent):
    """run's output and gradients in fp64: plain weights into transformers' own eager experts code."""
    params = {name: p.detach().cpu().double().requires_grad_() for name, p in shared.named_parameters()}
    x = x.detach().cpu().double().requires_grad_()
    index, weights, cotangent = index.cpu(), weights.cpu(), cotangent.cpu()
    parts = {}
    for name, proj in shared.projections.items():
        p = {key.rpartition(".")[2]: t for key, t in params.items() if key.startswith(f"projections.{name}.")}
        parts[name] = (plain_weights(proj, p), p.get("bias"))
    dense = copy.copy(shared.template)
    dense.__dict__.update(join_weights(shared.template, parts))  # plain attributes: autograd sees them as functions
    eager = type(dense).forward.__wrapped__
    y = eager(dense, x, index, weights.double())
    grads = torch.autograd.grad(y, [x, *params.values()], cotangent.double())
    return y.detach(), dict(zip(["input", *params], grads))


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.cpu().double() - expected.cpu()).norm() / expected.norm()).item()


def run(shared: SharedCoreExperts, x, index, weights, cotangent, backward: bool = True):
    """The module's output, the gradients of <output, cotangent> w.r.t. the input and every parameter, and the
    aten kernels that ran in the forward and in the backward."""
    x = x.clone().requires_grad_()
    params = dict(shared.named_parameters())
    with KernelCalls() as forward_calls:
        y = shared(x, index, weights)
    if not backward:
        return y.detach(), None, forward_calls, None
    with KernelCalls() as backward_calls:
        grads = torch.autograd.grad(y, [x, *params.values()], cotangent)
    return y.detach(), dict(zip(["input", *params], grads)), forward_calls, backward_calls


def case(form: str, dtype: torch.dtype, rank: int, model_type: str, monkeypatch, device: str = "cpu"):
    """A module of the form on `device`, a batch, and a count of the module's calls of its grouped_mm (kernel or
    loop)."""
    shared = compressed(model_type, FORMS[form], rank, dtype, device)
    calls = Counter()
    kernel_or_loop = experts.grouped_mm

    def counted(*args):
        calls["grouped_mm"] += 1
        return kernel_or_loop(*args)

    monkeypatch.setattr(experts, "grouped_mm", counted)
    return shared, routed_batch(shared.projections["down"].shape[0], dtype, device=device), calls


# gpt_oss's own gating reads gate = gate_up[..., ::2]: the gradient reaching the gate and up projections' last
# grouped_mm is a view with a stride of 2, which grouped_mm's backward refuses ("Invalid strides/sizes"); the kernel
# path makes it contiguous (experts.grouped_mm), and these cases check that it does.
PRECISION_IDS = ["fp32-r4", "fp32-r8", "bf16-r8", "fp32-r3-padded", "bf16-r4-padded"]
# (device, dtype, rank): every precision on the CPU; on a CUDA GPU, where the module gives torch's kernel bf16 alone
# (experts.grouped_mm), bf16 at an aligned rank and at one padded for the gradient
CASES = ([pytest.param("cpu", *precision, id=name) for precision, name in zip(PRECISIONS + PADDED, PRECISION_IDS)]
         + [pytest.param("cuda", torch.bfloat16, 8, id="cuda-bf16-r8", marks=ON_GPU),
            pytest.param("cuda", torch.bfloat16, 4, id="cuda-bf16-r4-padded", marks=ON_GPU)])


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("device, dtype, rank", CASES)
@pytest.mark.parametrize("form", list(FORMS))
def test_kernel_forward_matches_the_plain_math(form, device, dtype, rank, model_type, monkeypatch):
    shared, batch, calls = case(form, dtype, rank, model_type, monkeypatch, device)
    y, _, forward, _ = run(shared, *batch, backward=False)
    # every per-expert product ran on the kernel, none on the loop
    assert calls["grouped_mm"] > 0 and forward.calls[GROUPED_MM] == calls["grouped_mm"], (forward.calls, calls)
    expected, _ = reference(shared, *batch)
    assert y.dtype == dtype
    assert relative(y, expected) < TOLERANCE[dtype], relative(y, expected)


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("device, dtype, rank", CASES)
@pytest.mark.parametrize("form", list(FORMS))
def test_kernel_backward_matches_the_plain_math(form, device, dtype, rank, model_type, monkeypatch):
    shared, batch, calls = case(form, dtype, rank, model_type, monkeypatch, device)
    _, grads, forward, backward = run(shared, *batch)
    kernels, backward_kernels = forward.calls[GROUPED_MM], backward.calls[GROUPED_MM]
    # each kernel call of the forward is two in the backward: the gradients of its rows and of its per-expert matrices
    assert kernels == calls["grouped_mm"] > 0 and backward_kernels == 2 * kernels, (calls, kernels, backward_kernels)
    _, expected = reference(shared, *batch)
    assert grads.keys() == expected.keys()
    errors = {name: relative(grads[name], expected[name]) for name in grads}
    assert max(errors.values()) < TOLERANCE[dtype], errors


@pytest.mark.parametrize("dtype, rank", [(torch.float32, 4), (torch.bfloat16, 8), (torch.float32, 3)],
                         ids=["fp32-r4", "bf16-r8", "fp32-r3-padded"])
@pytest.mark.parametrize("form", list(FORMS))
def test_kernel_and_fallback_loop_agree(form, dtype, rank, monkeypatch):
    """The same module, batch and cotangent on the kernel and, with torch's grouped_mm taken away, on the loop."""
    shared, batch, _ = case(form, dtype, rank, "qwen3_moe", monkeypatch)
    y, grads, forward, _ = run(shared, *batch)
    monkeypatch.delattr(F, "grouped_mm")
    y_loop, grads_loop, forward_loop, backward_loop = run(shared, *batch)
    assert forward.calls[GROUPED_MM] > 0 and forward_loop.calls[GROUPED_MM] == backward_loop.calls[GROUPED_MM] == 0
    tol = LOOP_TOLERANCE[dtype]
    assert relative(y, y_loop.double()) < tol, relative(y, y_loop.double())
    errors = {name: relative(grads[name], grads_loop[name].double()) for name in grads}
    assert max(errors.values()) < tol, errors


# The batched product of the devices whose grouped_mm kernel refuses the dtype (fp32 and fp16 on CUDA, where the
# reconstruction trains in fp32): run here on the CPU by telling the module that its kernel does not take the inputs,
# and on a GPU as a user runs it. fp32 at rank 3 and 4: no alignment matters to bmm.
PADDED_CASES = [pytest.param("cpu", 3, id="cpu-fp32-r3"), pytest.param("cpu", 4, id="cpu-fp32-r4"),
                pytest.param("cuda", 4, id="cuda-fp32-r4", marks=ON_GPU)]


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("device, rank", PADDED_CASES)
@pytest.mark.parametrize("form", list(FORMS))
def test_padded_product_matches_the_plain_math(form, device, rank, model_type, monkeypatch):
    shared, batch, calls = case(form, torch.float32, rank, model_type, monkeypatch, device)
    if device == "cpu":
        monkeypatch.setattr(experts, "kernel_takes", lambda x: False)
    padded, batched = Counter(), experts.padded_bmm

    def counted(*args):
        y = batched(*args)
        padded["products"] += y is not None
        return y

    monkeypatch.setattr(experts, "padded_bmm", counted)
    y, grads, forward, _ = run(shared, *batch)
    # every per-expert product ran as one batched product, none on the kernel or the loop
    assert calls["grouped_mm"] > 0 and padded["products"] == calls["grouped_mm"], (calls, padded)
    assert forward.calls[GROUPED_MM] == 0 and forward.calls[torch.ops.aten.bmm.default] >= calls["grouped_mm"]
    expected_y, expected = reference(shared, *batch)
    assert relative(y, expected_y) < TOLERANCE[torch.float32], relative(y, expected_y)
    errors = {name: relative(grads[name], expected[name]) for name in grads}
    assert max(errors.values()) < TOLERANCE[torch.float32], errors


def test_padded_product_leaves_a_skewed_routing_to_the_loop(monkeypatch):
    """One expert taking most of the pairs would pad the stack to E times their number: past PADDING_LIMIT times the
    pairs and PADDED_BYTES (set to 0 here), padded_bmm declines, and grouped_mm's loop gives the product, forward and
    backward, as the plain per-expert math. Within the bytes, the skewed routing is padded as any other."""
    g = torch.Generator().manual_seed(0)
    # one expert a token; expert 0 takes 3/4 of them, 6 times the mean, and every other expert a few
    index = torch.tensor([[0] if t < 3 * T // 4 else [1 + t % (E - 1)] for t in range(T)])
    route = experts.Route.build(index, torch.rand(T, 1, generator=g), E)
    assert route.busy and max(route.counts) == 6 * T // E
    x = torch.randn(T, 6, generator=g, requires_grad=True)
    w = torch.randn(E, 6, 5, generator=g, requires_grad=True)
    assert experts.padded_bmm(x, w, route) is not None  # a few bytes: padded whatever the skew
    monkeypatch.setattr(experts, "PADDED_BYTES", 0)
    assert experts.padded_bmm(x, w, route) is None
    balanced = experts.Route.build(torch.arange(T)[:, None] % E, torch.rand(T, 1, generator=g), E)
    assert experts.padded_bmm(x, w, balanced) is not None
    expected = torch.cat([x_e @ w_e for x_e, w_e in zip(x.split(route.counts), w.unbind(0))])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experts, "kernel_takes", lambda x: False)
        y = experts.grouped_mm(x, w, route)
    assert torch.equal(y, expected)
    cotangent = torch.randn(y.shape, generator=g)
    for got, want in zip(torch.autograd.grad(y, [x, w], cotangent), torch.autograd.grad(expected, [x, w], cotangent)):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
