"""Integer storage of what every form stores (CompressionConfig(bits=...)): the quantized modules compute what their
dequantized weights do, the folder stores packed codes and scales whose bits are the report's, it loads back to the
same logits by every route, and the resident memory holds the integers, not float copies."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from conftest import calibration_ids, tiny_model, token_ids
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import Qwen3MoeConfig, TrainingArguments
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

import moe_compress as mc
from moe_compress import fit
from moe_compress.calibration.grams import ExpertGrams
from moe_compress.calibration.observe import observe
from moe_compress.compression import bits
from moe_compress.compression.config import MIXED_FORMS
from moe_compress.compression.fitting import fit_into, quantize_into
from moe_compress.compression.in_memory import LoadedModel
from moe_compress.discovery import split_weights
from moe_compress.data import DataConfig
from moe_compress.distill import DistillationConfig, distill, select_trainable, train_quantization_aware
from moe_compress.experts import Projection, Route, group_format, make_projection
from moe_compress.quantize import (INT4_KERNEL_ROWS, Int4Weight, QuantFormat, QuantizedMatrix, int4_kernel_rows, pack,
                                   quantize_rtn)
from moe_compress.testbed import load_testbed

METHODS = [("delta", {"target_ratio": 0.5}), ("basis", {"target_ratio": 0.5}), ("mixed", {"target_ratio": 0.5}),
           ("quantize", {})]


def compressed(method: str, size: dict, bits: int, symmetric: bool = True, calibrated: bool = True):
    model = tiny_model("qwen3_moe")
    config = mc.CompressionConfig(method=method, bits=bits, group_size=16, symmetric=symmetric, **size)
    report = mc.compress(model, config, calibration=calibration_ids() if calibrated else None, progress=False)
    return model, report


def folder_bits(folder, report) -> float:
    """Bits the folder stores per original expert weight: every tensor of the experts modules but their biases."""
    with safe_open(folder / "model.safetensors", "pt") as f:
        total = sum(8 * f.get_tensor(k).numel() * f.get_tensor(k).element_size()
                    for k in f.keys() if ".experts." in k and not k.endswith(".bias"))
    return total / report.params_before


@pytest.mark.parametrize("bits,symmetric", [(2, False), (3, True), (4, True), (8, False)])
@pytest.mark.parametrize("method,size", METHODS, ids=[m for m, _ in METHODS])
def test_a_quantized_module_computes_what_its_dequantized_weights_do(method, size, bits, symmetric):
    model, report = compressed(method, size, bits, symmetric)
    experts = model.model.layers[0].mlp.experts
    for projection in experts.projections.values():
        assert not any(name in dict(projection.named_parameters()) for name in projection.TENSORS)  # all integers
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(24, 32, generator=generator)
    index = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(24)])
    weights = torch.rand(24, 2, generator=generator).softmax(-1)
    with torch.no_grad():  # transformers' own experts code on every W_e rebuilt from the dequantized tensors
        assert torch.allclose(experts(x, index, weights), experts.reference_forward(x, index, weights), atol=1e-5)
    assert all(r.stored_bits is not None for r in report.rows)


@pytest.mark.parametrize("method,size", METHODS, ids=[m for m, _ in METHODS])
def test_a_forward_that_routes_some_experts_dequantizes_theirs_alone_and_computes_what_all_would(method, size,
                                                                                               monkeypatch):
    """One token routes 2 of the 4 experts: the per-expert tensors are dequantized for those 2 (the others' matrices
    unset), and the output is bit for bit the one with every tensor dequantized."""
    model, _ = compressed(method, size, bits=4, symmetric=False)
    experts = model.model.layers[0].mlp.experts
    x, index, weights = torch.randn(1, 32), torch.tensor([[3, 1]]), torch.tensor([[0.7, 0.3]])
    read = []
    dequantized = Projection.dequantized
    monkeypatch.setattr(Projection, "dequantized", lambda self, name, experts=None: read.append(experts) or
                        dequantized(self, name, experts))
    with torch.no_grad():
        partial = experts(x, index, weights)
        assert any(e is not None and e.tolist() == [1, 3] for e in read)  # some tensor read for the routed pair alone
        monkeypatch.setattr(Route, "routed_experts", lambda self: None)  # every expert's matrices, as with many tokens
        assert torch.equal(partial, experts(x, index, weights))


def bf16_experts(form: str, symmetric: bool) -> mc.SharedCoreExperts:
    """A bf16 experts module of `form` (32 experts of hidden 64, width 32) with every stored tensor in 4 bits, groups
    of 32: a shape and format torch's int4 kernel takes for the cores."""
    config = Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=32, num_experts=32, num_experts_per_tok=4)
    spec = mc.ModuleSpec(MIXED_FORMS if form == "mixed" else form, {"gate": 4, "up": 4, "down": 4})
    experts = mc.SharedCoreExperts.empty(Qwen3MoeExperts(config).to(torch.bfloat16), spec)
    with torch.no_grad():
        for proj in experts.projections.values():
            for name in proj.TENSORS:
                proj._parameters[name].normal_(0, 0.1)
                proj.quantize_(name, quantize_rtn(proj.matrix(name), group_format(QuantFormat(4, 32, symmetric),
                                                                                   proj.matrix(name).shape[-1])))
    return experts.eval()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("form", ["delta", "mixed"])
def test_4_bit_tensors_the_experts_share_run_through_torchs_int4_kernel_on_few_bf16_tokens(form, symmetric):
    """The kernel's product equals the dequantized core's (fp32 reference) to bf16's precision; the experts' output,
    the single cores and shared bases through the kernel, equals transformers' experts code on every W_e
    dequantized; from INT4_KERNEL_ROWS tokens the core is dequantized, where bf16 matmuls are native."""
    experts = bf16_experts(form, symmetric)
    up = experts.projections["up"]
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        reference = x.float() @ up.dequantized("core")[0].float().T
        assert up._int4_kernels("core", x) is not None
        got = up.shared_mm(x, "core").float()
        assert (got - reference).norm() / reference.norm() < 5e-3
        many = x.repeat(INT4_KERNEL_ROWS // 8, 1)
        by_kernel = int4_kernel_rows("cpu") > INT4_KERNEL_ROWS  # a CPU without native bf16 matmuls (AVX2)
        want = up._int4_kernels("core", x)(many) if by_kernel else many @ up.dequantized("core")[0].T
        assert torch.equal(up.shared_mm(many, "core"), want)
        index = torch.stack([torch.randperm(32, generator=torch.Generator().manual_seed(i))[:4] for i in range(8)])
        weights = torch.rand(8, 4, generator=torch.Generator().manual_seed(1)).softmax(-1).to(torch.bfloat16)
        fast = experts(x, index, weights).float()
        for proj in experts.projections.values():  # the tensors the experts share, not the per-expert ones (packed)
            assert {name for name, (_, kernels) in proj._kernels.items() if kernels is not None} == {
                name for name in proj.TENSORS if proj.shape_of(name)[0] == 1}
        rebuilt = experts.to_dense().float()  # transformers' own experts code on every W_e rebuilt, in fp32
        dense = type(rebuilt).forward.__wrapped__(rebuilt, x.float(), index, weights.float())
        assert (fast - dense).norm() / dense.norm() < 2e-2
        with torch.enable_grad():  # a gradient to pass back: the dequantized core, which autograd sees through
            assert up._int4_kernels("core", x.clone().requires_grad_()) is None


@pytest.mark.parametrize("form", ["delta", "mixed", "dense"])
def test_4_bit_experts_packed_for_the_cpu_hold_the_kernel_layout_alone_and_compute_what_the_reference_does(form):
    """Packed for the CPU (the vLLM plugin does it), every 4-bit tensor runs through the int4 kernel on any number of
    tokens and its codes are freed: the experts hold the kernel's layout instead, within the padding of the narrow
    factors to whole kernel groups. Codes loaded anew into a packed tensor (vLLM reloading weights) are read as
    stored until packed again."""
    experts = bf16_experts(form, symmetric=False)
    codes = [(p, name) for p, proj in experts.projections.items() for name in proj.stored]
    rebuilt = experts.to_dense().float()  # transformers' own experts code on every W_e dequantized, in fp32
    calls = []
    for tokens in (1, 16 * INT4_KERNEL_ROWS):  # decoding; prefill, 2 x INT4_KERNEL_ROWS pairs an expert on average
        index = torch.stack([torch.randperm(32, generator=torch.Generator().manual_seed(i))[:4] for i in range(tokens)])
        weights = torch.rand(tokens, 4, generator=torch.Generator().manual_seed(1)).softmax(-1).to(torch.bfloat16)
        calls.append((torch.randn(tokens, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16), index,
                      weights))
    with torch.no_grad():
        mc.pack_for_cpu(experts)
        mc.pack_for_cpu(experts)  # again (vLLM may process a layer twice): nothing laid out anew from placeholders
        assert not any(proj._kernels for proj in experts.projections.values())
        for call in calls:
            x, index, weights = call
            dense = type(rebuilt).forward.__wrapped__(rebuilt, x.float(), index, weights.float())
            got = experts(*call).float()
            assert (got - dense).norm() / dense.norm() < 2e-2
        for p, name in codes:
            proj = experts.projections[p]
            assert proj._buffers[f"{name}_packed"].untyped_storage().nbytes() <= 4
            layout = proj._packed[name][1].weights
            for k in layout:  # half a byte a code, padded to whole kernel groups and rows in sixteens
                cols, rows = k.scales_and_zeros.shape[0] * k.group_size, k.scales_and_zeros.shape[1]
                assert k.packed.nbytes == rows * cols // 2
                assert cols - k.in_features < k.group_size and rows - k.out_features < 16
            # a scale a row: the stored scales themselves, and one tensor of unit kernel scales for all the matrices
            per_row = [k for k in layout if k.row_scale is not None]
            assert per_row == (layout if proj._buffers[f"{name}_scale"].shape[-1] == 1 else [])
            assert all(k.row_scale.untyped_storage().data_ptr() == proj._buffers[f"{name}_scale"].data_ptr()
                       for k in per_row)
            assert len({k.scales_and_zeros.data_ptr() for k in per_row}) <= 1
        other = bf16_experts(form, symmetric=False)
        for p, proj in experts.projections.items():
            for name in proj.stored:  # as the plugin's loader does: new storage in place of the placeholder
                for buffer in (f"{name}_packed", f"{name}_scale", f"{name}_zero"):
                    proj._buffers[buffer].data = other.projections[p]._buffers[buffer].clone()
        assert torch.equal(experts(*calls[0]), other(*calls[0]))
        assert not any(proj._packed for proj in experts.projections.values())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows,cols,group", [(40, 50, None), (48, 96, 32), (16, 200, None), (64, 128, 128)])
def test_the_int4_kernel_layout_pads_narrow_matrices_and_computes_their_product(rows, cols, group, symmetric):
    """Any 4-bit matrix of kernel-sized groups or one group a row (padded to whole kernel groups and rows in
    sixteens, scales repeated) computes x @ W^T of its dequantized W (fp32 reference) to bf16's precision."""
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols))
    format = group_format(QuantFormat(4, group, symmetric), cols)
    q = quantize_rtn(W, format)
    scales = q.scales.to(torch.bfloat16)
    weight = Int4Weight.of(pack(q.codes, 4), cols, scales, q.zeros, format)
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    reference = x.float() @ QuantizedMatrix(q.codes, scales, q.zeros, format).dequantize().float().T
    got = weight(x)
    assert got.shape == (3, rows) and got.dtype == torch.bfloat16
    assert (got.float() - reference).norm() / reference.norm() < 5e-3


@pytest.mark.parametrize("fault", ["raises", "wrong"])
def test_an_int4_kernel_that_fails_or_is_wrong_is_dropped_with_a_warning_for_the_dequantized_core(fault, monkeypatch):
    """Where the kernel (its CUDA layout could not be run here) raises or computes something else, the core is
    dequantized instead: a warning, then the product of the dequantized core."""
    def broken(self, x):
        if fault == "raises":
            raise RuntimeError("no kernel for this device\nsecond line")
        return torch.zeros(x.shape[0], self.scales_and_zeros.shape[1], dtype=x.dtype)

    monkeypatch.setattr(Int4Weight, "__call__", broken)
    up = bf16_experts("delta", symmetric=True).projections["up"]
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad(), pytest.warns(UserWarning, match="the core is dequantized instead"):
        assert up._int4_kernels("core", x) is None
    with torch.no_grad():
        assert torch.equal(up.shared_mm(x, "core"), x @ up.dequantized("core")[0].T)


@pytest.mark.parametrize("method,size", METHODS, ids=[m for m, _ in METHODS])
def test_the_folder_stores_the_reported_bits_and_loads_back_to_the_same_logits(tmp_path, method, size):
    model, report = compressed(method, size, bits=3, symmetric=False)
    folder = mc.save_compressed(model, tmp_path / "q", report=report)
    assert folder_bits(folder, report) == pytest.approx(report.bits_per_weight, rel=1e-12)
    loaded = mc.load_compressed(folder)
    with torch.no_grad():
        assert torch.equal(loaded(token_ids()).logits, model(token_ids()).logits)
    # resident: integer codes and 16-bit scales, no float copy of a quantized tensor left behind by a forward
    resident = {name: t for name, t in loaded.state_dict().items() if ".experts." in name}
    assert not any(name.endswith((".core", ".u", ".v")) for name in resident)
    assert all(t.dtype in (torch.int32, torch.int64, torch.float16) for t in resident.values())
    resident_bits = sum(8 * t.numel() * t.element_size() for name, t in resident.items() if not name.endswith("bias"))
    assert resident_bits / report.params_before == pytest.approx(folder_bits(folder, report), rel=1e-12)
    assert all(p._memo is None for m in loaded.modules() if isinstance(m, mc.SharedCoreExperts)
               for p in m.projections.values())


def test_streamed_data_free_quantization_writes_the_in_memory_folders_tensors(tmp_path):
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "model")
    config = mc.CompressionConfig(target_ratio=0.5, method="delta", bits=4, group_size=16)
    streamed = mc.compress_checkpoint(tmp_path / "model", tmp_path / "streamed", config, progress=False)
    model = tiny_model("qwen3_moe")
    in_memory = mc.compress(model, config, progress=False)
    assert streamed.bits_per_weight == in_memory.bits_per_weight
    loaded = mc.load_compressed(tmp_path / "streamed")
    ours = {k: v for k, v in model.state_dict().items() if ".experts." in k}
    theirs = {k: v for k, v in loaded.state_dict().items() if ".experts." in k}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_dense_export_of_a_quantized_folder_computes_its_logits(tmp_path):
    model, report = compressed("mixed", {"target_ratio": 0.5}, bits=4)
    folder = mc.save_compressed(model, tmp_path / "q", report=report)
    mc.export_dense(folder, tmp_path / "dense")
    with torch.no_grad():
        assert torch.allclose(mc.load_model(str(tmp_path / "dense"))(token_ids()).logits, model(token_ids()).logits,
                              atol=1e-5)


def projection_and_metric(form: str):
    """A fitted float projection of the tiny model's first up projection, W and its calibrated metric."""
    model = tiny_model("qwen3_moe")
    name, grams = next(iter(observe(model, calibration_ids(), ExpertGrams, progress=False).items()))
    W = split_weights(model.get_submodule(name))["up"][0].detach().float()
    metric = grams.metric("up")
    proj = make_projection(form, "up", *W.shape, rank=2)
    fit_into(proj, W, None, mc.CompressionConfig(rank=2, method=form), torch.device("cpu"), metric)
    return proj, W, metric


@pytest.mark.parametrize("form", ["delta", "basis"])
def test_refitting_what_stays_in_floats_lowers_the_error_of_quantizing_each_tensor_alone(form):
    """quantize_into refits the factors to the quantized core and each side to the other: against rounding each
    fitted tensor as it is (the crude stack), its error in the metric is lower."""
    format = QuantFormat(bits=2, group_size=16, symmetric=False)
    proj, W, metric = projection_and_metric(form)
    crude = copy.deepcopy(proj)
    with torch.no_grad():
        for name in crude.TENSORS:
            value = crude.matrix(name).float()
            rounded = quantize_rtn(value, format if value.shape[-1] % 16 == 0 else QuantFormat(2, None, False))
            crude.quantize_(name, rounded)
    quantize_into(proj, W, format, metric)
    careful, naive = (fit.relative_error(W, p.dense().float(), metric) for p in (proj, crude))
    assert careful < naive, (careful, naive)


def test_gptq_in_the_metric_beats_rounding_in_the_metric():
    """The experts quantized as they are (the dense form): GPTQ in each expert's routed-input metric against round to
    nearest, both measured in that metric."""
    model = tiny_model("qwen3_moe")
    name, grams = next(iter(observe(model, calibration_ids(), ExpertGrams, progress=False).items()))
    W = split_weights(model.get_submodule(name))["up"][0].detach().float()
    metric = grams.metric("up")
    format = QuantFormat(bits=3, group_size=16, symmetric=True)
    calibrated, rounded = (make_projection("dense", "up", *W.shape, 0) for _ in range(2))
    for proj, M in ((calibrated, metric), (rounded, None)):
        fit_into(proj, W, None, mc.CompressionConfig(method="quantize", bits=3), torch.device("cpu"))
        quantize_into(proj, W, format, M)
    errors = [fit.relative_error(W, p.dense().float(), metric) for p in (calibrated, rounded)]
    assert errors[0] < errors[1], errors


def test_bad_quantization_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match="method=quantize stores every expert as it is, quantized: give bits"):
        mc.CompressionConfig(method="quantize")
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        mc.CompressionConfig(target_ratio=0.3, bits=5)
    with pytest.raises(ValueError, match="the wrapped form.*has no quantized storage"):
        mc.CompressionConfig(target_ratio=0.3, method="als", bits=4)


def test_pure_quantization_has_no_wrappers_to_train_said_in_one_line_and_the_card_gives_the_bits(tmp_path):
    model, report = compressed("quantize", {}, bits=4)
    with pytest.raises(ValueError, match=r"train=wrappers leaves nothing to train: .* hold no wrappers") as error:
        select_trainable(model, "wrappers", train_routers=False)
    assert "\n" not in str(error.value)
    assert select_trainable(model, "wrappers", train_routers=True)[0] > 0  # the routers are floats
    card = (mc.save_compressed(model, tmp_path / "q", report=report) / "README.md").read_text()
    assert f"| bits per expert weight (every stored tensor and scale) | {report.bits_per_weight:.3f} |" in card


@pytest.mark.parametrize("train,shadows", [("outside-experts", set()), ("wrappers", {"u", "v"}),
                                           ("wrappers+cores", {"core", "u", "v"})])
def test_only_the_quantized_tensors_that_train_get_float_shadows(train, shadows):
    model, _ = compressed("mixed", {"target_ratio": 0.5}, bits=4)
    train_quantization_aware(model, train)
    projections = [p for m in model.modules() if isinstance(m, mc.SharedCoreExperts) for p in m.projections.values()]
    assert all(set(p._parameters) - {"bias"} == shadows for p in projections)
    assert all(set(p.stored) == {"core", "u", "v"} for p in projections)  # the integer storage stays


def experts_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".experts." in k}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_quantized_folder_distills_quantization_aware_into_quantized_checkpoints_and_resumes(tmp_path):
    teacher, tokenizer = load_testbed()
    student, _ = load_testbed()
    report = mc.compress(student, mc.CompressionConfig(target_ratio=0.3, method="delta", bits=4), progress=False)
    student = mc.load_compressed(mc.save_compressed(student, tmp_path / "q", report=report))
    before = experts_state(student)
    args = lambda steps: TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=2, save_steps=2,
        learning_rate=1e-2, report_to="none", use_cpu=True, seed=0, disable_tqdm=True)  # a rate that moves codes
    data, config = DataConfig(seq_len=32), DistillationConfig(train="wrappers+cores")
    distill(student, teacher, tokenizer, data, config, args(2))
    checkpoint = experts_state(mc.load_compressed(tmp_path / "run" / "checkpoint-2"))
    assert checkpoint.keys() == before.keys()  # the same integer storage, no float shadow saved
    assert all(v.dtype in (torch.int32, torch.int64, torch.float16) for v in checkpoint.values())
    packed = [k for k in before if k.endswith("_packed")]
    assert all(torch.equal(checkpoint[k], before[k]) for k in before if k not in packed)  # scales fixed
    assert sum((checkpoint[k] != before[k]).sum().item() for k in packed) > 0.1 * sum(before[k].numel() for k in packed)
    ids = token_ids(length=16)
    student.eval()
    with torch.no_grad():  # the trained model computes what its checkpoint does: the forward rounds as saving does
        assert torch.equal(student(ids).logits, mc.load_compressed(tmp_path / "run" / "checkpoint-2")(ids).logits)
    # resuming loads a checkpoint, which holds no shadows, into a model training quantization-aware, as the Trainer
    # does: nothing missing, the shadows set from its codes
    fresh = mc.load_compressed(tmp_path / "q")
    train_quantization_aware(fresh, "wrappers+cores")
    loaded = fresh.load_state_dict(load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors"), strict=False)
    assert loaded.missing_keys == ["lm_head.weight"] and not loaded.unexpected_keys  # the head is tied, not saved
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, student(ids).logits)
    resumed = distill(mc.load_compressed(tmp_path / "q"), teacher, tokenizer, data, config, args(4))
    assert resumed.state.global_step == 4 and (tmp_path / "run" / "checkpoint-4").is_dir()


@pytest.mark.parametrize("budget", [3.0, 5.0])
def test_target_bits_is_respected_as_the_saved_folder_measures_it_and_takes_the_least_error(tmp_path, budget):
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "model")
    config = mc.CompressionConfig(target_bits=budget, group_size=16)
    model = tiny_model("qwen3_moe")
    report = mc.compress(model, config, calibration=calibration_ids(), progress=False)
    folder = mc.save_compressed(model, tmp_path / "q", report=report)
    assert folder_bits(folder, report) == pytest.approx(report.bits_per_weight, rel=1e-12)
    assert report.bits_per_weight <= budget
    candidates = report.choice["candidates"]
    assert all(c["bits_per_weight"] <= budget for c in candidates) and len(candidates) >= 2
    assert {c["symmetric"] for c in candidates} == {True, False}
    assert all(c["symmetric"] for c in candidates if c["method"] == "quantize")  # pure quantization: symmetric alone
    assert report.choice["chosen"] == min(candidates, key=lambda c: c["error"])
    assert report.choice["chosen"]["bits_per_weight"] == pytest.approx(report.bits_per_weight, rel=1e-12)
    # the folder records the budget as asked; a checkpoint folder compressed to it makes the same choice
    assert model.config.quantization_config.compression["target_bits"] == budget
    streamed = mc.compress_checkpoint(tmp_path / "model", tmp_path / "s", config, calibration=calibration_ids(),
                                      progress=False)
    assert streamed.choice["chosen"]["method"] == report.choice["chosen"]["method"]
    assert streamed.bits_per_weight <= budget


@pytest.mark.parametrize("calibrated", [False, True])
def test_target_bits_measures_at_each_width_the_largest_kept_fraction_within_its_budget(calibrated):
    """The definition, written out: each form candidate stores at most the budget, and KEPT_STEP more (short of the
    last fraction scanned) would store more than the budget or not fit."""
    budget = 3.0
    source = LoadedModel(tiny_model("qwen3_moe"), [token_ids()] if calibrated else None, batch_size=8)
    found, least = bits.candidates(source, mc.CompressionConfig(target_bits=budget, group_size=16))
    forms = [(config, planned) for config, planned in found if config.method != "quantize"]
    assert len({config.bits for config, _ in forms}) >= 2 and least <= min(p for _, p in found)
    for config, planned in found:
        assert planned <= budget and planned == bits.planned_bits(source, config)
    for config, _ in forms:
        assert config.target_bits is None and config.rank_allocation == "uniform"
        if config.target_ratio < bits.KEPT[-1]:
            more = dataclasses.replace(config, target_ratio=config.target_ratio + bits.KEPT_STEP)
            assert (bits.planned_bits(source, more.for_data(calibrated)) or math.inf) > budget
    assert any(config.target_ratio not in bits.KEPT for config, _ in forms)  # found between the fractions scanned


def test_target_bits_below_every_choice_or_beside_other_sizes_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"target_bits=0.5 is below what any choice stores \(the least: "
                                         r"[\d.]+ bits per weight\); use target_bits >= [\d.]+") as error:
        mc.compress(tiny_model("qwen3_moe"), mc.CompressionConfig(target_bits=0.5), progress=False)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="target_bits picks the kept fraction, the form and the bits itself; drop "
                                         "target_ratio, bits"):
        mc.CompressionConfig(target_bits=3, target_ratio=0.3, bits=4)
    with pytest.raises(ValueError, match="target_bits=-1 is not a budget"):
        mc.CompressionConfig(target_bits=-1)
