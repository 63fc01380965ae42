"""The CUDA kernels against the grid_sample reference (runs only where a GPU is present)."""

from __future__ import annotations

import pytest
import torch

from sparse_detr.ops import load_backend, ms_deform_attn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

CASES = [
    (1, [(7, 9)], 1, 3, 5, 1, 1.0),
    (2, [(5, 11), (3, 6), (2, 3), (1, 2)], 8, 32, 17, 4, 1.0),
    (3, [(13, 7), (7, 4), (4, 2)], 2, 30, 11, 3, 3.0),
    (5, [(6, 5), (3, 3)], 3, 71, 9, 2, 1.4),
    (4, [(9, 10), (5, 5), (3, 3), (2, 2)], 4, 32, 0, 4, 1.0),
    (2, [(100, 134), (50, 67), (25, 34), (13, 17)], 8, 32, 300, 4, 1.2),
]


@pytest.fixture(scope="module", autouse=True)
def cuda_backend():
    status = load_backend("cuda")
    assert status.available, status.reason


def _cuda_inputs(make_op_inputs, case, dtype):
    batch, shapes, heads, head_dim, queries, points, spread = case
    inputs = make_op_inputs(batch, shapes, heads, head_dim, queries, points, dtype, spread)
    return [t.cuda() for t in inputs]


def _grads(backend, inputs, grad_output):
    value, locations, weights = (inputs[i].clone().requires_grad_() for i in (0, 3, 4))
    out = ms_deform_attn(value, inputs[1], inputs[2], locations, weights, backend=backend)
    return (out, *torch.autograd.grad(out, (value, locations, weights), grad_output))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-L{len(c[1])}-D{c[3]}-Lq{c[4]}")
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_cuda_matches_reference(make_op_inputs, case, dtype, tolerance):
    inputs = _cuda_inputs(make_op_inputs, case, dtype)
    n, lq, m, d = inputs[0].shape[0], inputs[3].shape[1], inputs[0].shape[2], inputs[0].shape[3]
    grad_output = torch.randn(n, lq, m * d, device="cuda", dtype=dtype)
    for ours, reference in zip(_grads("cuda", inputs, grad_output), _grads("pytorch", inputs, grad_output)):
        scale = reference.abs().max().clamp_min(1.0) if reference.numel() else 1.0
        torch.testing.assert_close(ours / scale, reference / scale, rtol=0, atol=tolerance * 10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_close_to_float32(make_op_inputs, dtype):
    inputs = _cuda_inputs(make_op_inputs, CASES[1], torch.float32)
    grad_output = torch.randn(2, 17, 256, device="cuda")
    full = _grads("cuda", inputs, grad_output)
    half_inputs = [inputs[0].to(dtype), *inputs[1:]]
    reduced = _grads("cuda", half_inputs, grad_output.to(dtype))
    assert reduced[0].dtype == dtype and reduced[1].dtype == dtype
    for ours, reference in zip(reduced, full):
        relative = (ours.float() - reference).norm() / reference.norm()
        assert relative < 1e-2, relative


def test_non_contiguous_and_large_batch(make_op_inputs):
    inputs = _cuda_inputs(make_op_inputs, (9, [(6, 7), (3, 4)], 4, 8, 10, 2, 1.0), torch.float64)
    value, shapes, starts, locations, weights = inputs
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    expected = ms_deform_attn(*inputs, backend="pytorch")
    torch.testing.assert_close(
        ms_deform_attn(value_t, shapes, starts, locations, weights, backend="cuda"), expected, rtol=0, atol=1e-10
    )
