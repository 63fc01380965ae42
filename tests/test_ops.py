"""The deformable attention op: C++ CPU kernel vs the grid_sample reference, gradients, dispatch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sparse_detr.ops import BackendUnavailableError, loader, ms_deform_attn, resolve_backend

# (batch, level shapes, heads, channels per head, queries, points, spread of the locations)
SHAPE_CASES = [
    (1, [(7, 9)], 1, 3, 5, 1, 1.0),
    (2, [(5, 11), (3, 6), (2, 3), (1, 2)], 8, 32, 17, 4, 1.0),
    (3, [(13, 7), (7, 4), (4, 2)], 2, 30, 11, 3, 3.0),  # many points far outside the maps
    (5, [(6, 5), (3, 3)], 3, 71, 9, 2, 1.4),
    (4, [(9, 10), (5, 5), (3, 3), (2, 2)], 4, 32, 0, 4, 1.0),  # no queries
]


def _run(backend, inputs):
    return ms_deform_attn(*inputs, backend=backend)


@pytest.mark.parametrize("case", SHAPE_CASES, ids=lambda c: f"N{c[0]}-L{len(c[1])}-M{c[2]}-D{c[3]}-Lq{c[4]}")
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_cpu_forward_matches_reference(cpu_backend_available, make_op_inputs, case, dtype, tolerance):
    batch, shapes, heads, head_dim, queries, points, spread = case
    inputs = make_op_inputs(batch, shapes, heads, head_dim, queries, points, dtype, spread)
    cpu, reference = _run("cpu", inputs), _run("pytorch", inputs)
    assert cpu.shape == (batch, queries, heads * head_dim) and cpu.dtype == dtype
    torch.testing.assert_close(cpu, reference, rtol=0, atol=tolerance)


def test_padded_value_rows_are_respected(cpu_backend_available, make_op_inputs):
    value, shapes, starts, locations, weights = make_op_inputs(2, [(8, 6), (4, 3)], 2, 5, 13, 4)
    value[1, 30:48] = 0.0  # the padded part of the second image's first level
    inputs = (value, shapes, starts, locations, weights)
    torch.testing.assert_close(_run("cpu", inputs), _run("pytorch", inputs), rtol=0, atol=1e-10)


def test_non_contiguous_inputs(cpu_backend_available, make_op_inputs):
    value, shapes, starts, locations, weights = make_op_inputs(2, [(6, 7), (3, 4)], 4, 8, 10, 2)
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    locations_t = locations.permute(1, 0, 2, 3, 4, 5).contiguous().permute(1, 0, 2, 3, 4, 5)
    weights_t = weights.transpose(3, 4).contiguous().transpose(3, 4)
    assert not (value_t.is_contiguous() or locations_t.is_contiguous() or weights_t.is_contiguous())
    expected = _run("pytorch", (value, shapes, starts, locations, weights))
    torch.testing.assert_close(
        _run("cpu", (value_t, shapes, starts, locations_t, weights_t)), expected, rtol=0, atol=1e-10
    )


def test_gradcheck_cpu(cpu_backend_available, make_op_inputs):
    value, shapes, starts, locations, weights = make_op_inputs(2, [(4, 5), (2, 3)], 2, 3, 3, 2, spread=1.3)
    value.requires_grad_()
    locations.requires_grad_()
    weights.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, shapes, starts, loc, w, backend="cpu"),
        (value, locations, weights),
        eps=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("case", SHAPE_CASES[1:4], ids=["M8-D32", "outside", "D71"])
def test_cpu_gradients_match_reference_float32(cpu_backend_available, make_op_inputs, case):
    batch, shapes, heads, head_dim, queries, points, spread = case
    inputs = make_op_inputs(batch, shapes, heads, head_dim, queries, points, torch.float32, spread)
    grad_output = torch.randn(batch, queries, heads * head_dim)
    grads = {}
    for backend in ("cpu", "pytorch"):
        value, locations, weights = (inputs[i].clone().requires_grad_() for i in (0, 3, 4))
        out = ms_deform_attn(value, inputs[1], inputs[2], locations, weights, backend=backend)
        grads[backend] = torch.autograd.grad(out, (value, locations, weights), grad_output)
    for cpu_grad, reference_grad in zip(grads["cpu"], grads["pytorch"]):
        scale = reference_grad.abs().max().clamp_min(1.0)
        torch.testing.assert_close(cpu_grad / scale, reference_grad / scale, rtol=0, atol=1e-5)


def test_empty_queries_backward(cpu_backend_available, make_op_inputs):
    value, shapes, starts, locations, weights = make_op_inputs(2, [(3, 4)], 2, 4, 0, 2)
    value.requires_grad_()
    ms_deform_attn(value, shapes, starts, locations, weights, backend="cpu").sum().backward()
    assert value.grad is not None and value.grad.abs().sum() == 0


def test_reduced_precision_on_cpu_runs_in_float32(cpu_backend_available, make_op_inputs):
    value, shapes, starts, locations, weights = make_op_inputs(1, [(5, 6), (3, 3)], 2, 8, 7, 2, torch.float32)
    expected = _run("pytorch", (value, shapes, starts, locations, weights))
    out = _run("cpu", (value.bfloat16(), shapes, starts, locations, weights))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_torch_compile_fullgraph(cpu_backend_available, make_op_inputs):
    value, shapes, starts, locations, weights = make_op_inputs(2, [(6, 5), (3, 3)], 2, 4, 7, 2, torch.float32)

    def attend(v, loc, w):
        return ms_deform_attn(v * 2.0, shapes, starts, loc.clamp(0, 1), w.softmax(-1), backend="cpu")

    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(value, locations, weights), attend(value, locations, weights))


def test_backend_resolution_errors():
    with pytest.raises(ValueError, match="unknown op backend"):
        resolve_backend("triton", "cpu")
    with pytest.raises(ValueError, match="cannot run on cpu tensors"):
        resolve_backend("cuda", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
            resolve_backend("cuda", "cuda")


def test_environment_variable_sets_default(monkeypatch, cpu_backend_available):
    monkeypatch.setenv("SDETR_OP_BACKEND", "pytorch")
    assert resolve_backend(None, "cpu") == "pytorch"
    monkeypatch.setenv("SDETR_OP_BACKEND", "cpu")
    assert resolve_backend(None, "cpu") == "cpu"
    assert resolve_backend("pytorch", "cpu") == "pytorch"  # an explicit argument wins
    monkeypatch.setenv("SDETR_OP_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SDETR_OP_BACKEND"):
        resolve_backend(None, "cpu")


def test_cached_library_loads_without_compiling(monkeypatch, cpu_backend_available):
    monkeypatch.setattr(loader, "_loaded", {})

    def no_compiler(*args, **kwargs):
        raise AssertionError("a cached build must not be compiled again")

    monkeypatch.setattr(loader, "compile_extension", no_compiler)
    assert loader.load_backend("cpu").available


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
    )


def test_build_failure_falls_back_with_one_warning(tmp_path):
    """A broken compiler: the default backend warns once, names the log, and uses the reference."""
    broken_compiler = tmp_path / "broken-c++"
    broken_compiler.write_text(
        '#!/bin/sh\nif [ "$1" = --version ]; then exec c++ --version; fi\n'
        'echo "error: this compiler is broken on purpose" >&2\nexit 1\n'
    )
    broken_compiler.chmod(0o755)
    result = _python(
        """
        import warnings, torch
        from sparse_detr.ops import ms_deform_attn, BackendUnavailableError
        v = torch.randn(1, 6, 1, 2); shapes = torch.tensor([[2, 3]]); starts = torch.tensor([0])
        loc = torch.rand(1, 4, 1, 1, 1, 2); w = torch.rand(1, 4, 1, 1, 1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = ms_deform_attn(v, shapes, starts, loc, w)
            ms_deform_attn(v, shapes, starts, loc, w)
        messages = [str(c.message) for c in caught if "sparse_detr" in str(c.message)]
        assert len(messages) == 1, messages
        print(messages[0])
        try:
            ms_deform_attn(v, shapes, starts, loc, w, backend="cpu")
        except BackendUnavailableError as error:
            print("explicit:", error)
        """,
        {"TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": str(broken_compiler), "SDETR_OP_BACKEND": ""},
    )
    assert result.returncode == 0, result.stderr
    warning, explicit = result.stdout.strip().splitlines()[-2:]
    assert "using the slower 'pytorch' reference" in warning and "build.log" in warning
    assert explicit.startswith("explicit:") and "build.log" in explicit
    logs = list(tmp_path.rglob("build.log"))
    assert logs and "broken on purpose" in logs[0].read_text()
