"""fvcore GFLOPs: the op handles on hand-computed cases, the model count and the reference figures."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from fvcore.nn import FlopCountAnalysis
from torch import nn

from sparse_detr.analysis.flops import FLOP_HANDLES, TraceableDetector, count_flops, gflops_as_reference
from sparse_detr.analysis.reference_figures import reference_gflops
from sparse_detr.config import get_preset
from sparse_detr.models import MSDeformAttn, build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # counting does not depend on threads


def _analysis(module: nn.Module, *inputs) -> FlopCountAnalysis:
    analysis = FlopCountAnalysis(module, inputs).set_op_handle(**FLOP_HANDLES)
    analysis.unsupported_ops_warnings(False)
    analysis.tracer_warnings("none")
    return analysis


class _Attention(nn.Module):
    """MSDeformAttn on a fixed backend, with the layout as constant tensors (traceable inputs only)."""

    def __init__(self, backend: str):
        super().__init__()
        self.attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3)
        self.backend = backend
        self.register_buffer("shapes", torch.tensor([[4, 6], [2, 3]]))
        self.register_buffer("starts", torch.tensor([0, 24]))

    def forward(self, query, reference_points, values):
        return self.attn(query, reference_points, values, self.shapes, self.starts, backend=self.backend)


@pytest.mark.parametrize("backend", ["pytorch", "cpu"])
def test_deformable_attention_counts_four_flops_per_sampled_value_per_channel(backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_backend_available")
    torch.manual_seed(0)
    module = _Attention(backend).eval()
    n, queries, tokens = 2, 5, 4 * 6 + 2 * 3
    inputs = (torch.randn(n, queries, 16), torch.rand(n, queries, 2, 2), torch.randn(n, tokens, 16))
    analysis = _analysis(module, *inputs)
    # N·Lq·M·L·P·D·4 with M=2 heads, L=2 levels, P=3 points, D=16/2 channels per head
    sampling = 2 * 5 * 2 * 2 * 3 * 8 * 4
    assert sampling == 3840
    linears = n * queries * 16 * 24 + n * queries * 16 * 12 + n * tokens * 16 * 16 + n * queries * 16 * 16
    op_name = "grid_sampler" if backend == "pytorch" else "ms_deform_attn"  # what the trace records
    assert analysis.by_operator()[op_name] == sampling
    assert analysis.total() == sampling + linears == 27520


def test_scaled_dot_product_attention_counts_its_two_matrix_products():
    class Fused(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    class Explicit(nn.Module):
        def forward(self, q, k, v):
            return (q @ k.transpose(-2, -1)).softmax(-1) @ v

    inputs = (torch.randn(2, 4, 7, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 6))
    assert _analysis(Fused(), *inputs).total() == 2 * 4 * 7 * 9 * (8 + 6)
    assert _analysis(Explicit(), *inputs).total() == 2 * 4 * 7 * 9 * (8 + 6)


@pytest.fixture(scope="module", name="tiny_model")
def tiny_model_fixture():
    return tiny_model()


def test_sparse_gflops_rise_with_the_keep_ratio(tiny_model):
    image = torch.randn(3, 64, 80)
    counts = []
    for keep_ratio in (0.1, 0.4, 1.0):
        tiny_model.set_keep_ratio(keep_ratio)
        counts.append(count_flops(tiny_model, [image]))
    tiny_model.set_keep_ratio(0.3)
    gflops = [count.gflops for count in counts]
    assert gflops[0] < gflops[1] < gflops[2]
    for count in counts:
        assert count.by_module["encoder_aux_heads"] > 0
        assert count.gflops == pytest.approx(count.gflops_with_aux - count.by_module["encoder_aux_heads"])
        assert sum(count.by_module.values()) == pytest.approx(count.gflops_with_aux)
        stages = count.by_stage  # the paper's split of the inference cost
        assert sum(stages.values()) == pytest.approx(count.gflops) and min(stages.values()) > 0
        assert stages["encoder"] == pytest.approx(count.by_module["encoder"] + count.by_module["scoring_network"])
        assert count.skipped["aten::softmax"] > 0 and "sparse_detr::ms_deform_attn" not in count.skipped
    # only the encoder (and its aux heads) depends on ρ
    assert counts[0].by_module["backbone"] == counts[2].by_module["backbone"]
    assert counts[0].by_module["encoder"] < counts[2].by_module["encoder"]


def test_gflops_equal_a_plain_inference_trace_and_the_mean_over_images(tiny_model):
    tiny_model.train()
    images = torch.randn(2, 3, 64, 80)
    count = count_flops(tiny_model, list(images))
    assert tiny_model.training  # mode restored
    tiny_model.eval()
    with torch.no_grad():
        plain = _analysis(TraceableDetector(tiny_model, return_aux=False), images[:1])
        plain.uncalled_modules_warnings(False)
        assert count.gflops == pytest.approx(plain.total() / 1e9, rel=1e-9)
    assert count_flops(tiny_model, images).gflops == pytest.approx(count.gflops)  # a batch of 2, per image
    assert count.images == 2


def test_bad_images_are_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        count_flops(tiny_model, torch.randn(3, 64, 64))


@pytest.mark.slow
def test_r50_gflops_match_the_reference_at_850x1040():
    preset = "sparse-rho0.1"
    model = build_model(get_preset(preset))
    count = count_flops(model, [torch.randn(3, 850, 1040)])
    reference = reference_gflops("r50", preset, (850, 1040))
    assert count.gflops == pytest.approx(reference.without_aux, rel=5e-3)
    # the whole difference: the reference runs the decoder's box heads twice with box refinement
    assert gflops_as_reference(count, model.config.model) == pytest.approx(reference.without_aux, abs=1e-3)
    as_reference_with_aux = count.gflops_with_aux + count.by_module["decoder_box_heads"]
    assert as_reference_with_aux == pytest.approx(reference.with_aux, abs=1e-3)
