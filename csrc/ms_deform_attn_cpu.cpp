// Multi-scale deformable attention: CPU kernels for the sparse_detr::ms_deform_attn op (the forward
// rows and the bilinear corners are in ms_deform_attn_cpu_kernel.h, shared with onnxruntime).
//
// Forward runs in parallel over (n, q, m) output rows. Backward runs in parallel over (n, m): every
// task owns the grad_value slice [n, :, m, :], so the scatter needs no atomics and is deterministic.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ms_deform_attn_checks.h"
#include "ms_deform_attn_cpu_kernel.h"

#include <cmath>
#include <tuple>
#include <vector>

namespace {

// Channels handled per inner step: fixed-width lanes the compiler vectorizes without reordering sums.
constexpr int64_t kLanes = 16;

using sparse_detr::bilinear_corners;
using sparse_detr::Corners;
using sparse_detr::Geometry;

Geometry check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                      const at::Tensor& attention_weights) {
  TORCH_CHECK(spatial_shapes.is_cpu() && level_start_index.is_cpu(),
              "ms_deform_attn (cpu): spatial_shapes and level_start_index must be CPU tensors");
  TORCH_CHECK(value.scalar_type() == sampling_locations.scalar_type() &&
                  value.scalar_type() == attention_weights.scalar_type(),
              "ms_deform_attn (cpu): value, sampling_locations and attention_weights must share "
              "one dtype, got ", value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ",
              attention_weights.scalar_type());
  return sparse_detr::check_geometry(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights);
}

template <typename scalar_t>
void forward_kernel(const Geometry& g, const scalar_t* value, const int64_t* hw,
                    const int64_t* starts, const scalar_t* locations, const scalar_t* weights,
                    scalar_t* output) {
  at::parallel_for(0, sparse_detr::forward_rows(g), sparse_detr::forward_grain(g),
                   [&](int64_t begin, int64_t end) {
                     sparse_detr::forward_rows_kernel(g, value, hw, starts, locations, weights,
                                                      output, begin, end);
                   });
}

template <typename scalar_t>
void backward_kernel(const Geometry& g, const scalar_t* value, const int64_t* hw,
                     const int64_t* starts, const scalar_t* locations, const scalar_t* weights,
                     const scalar_t* grad_output, scalar_t* grad_value, scalar_t* grad_locations,
                     scalar_t* grad_weights) {
  const int64_t token_stride = g.M * g.D;
  at::parallel_for(0, g.N * g.M, 1, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zero_row(g.D, scalar_t(0));
    Corners<scalar_t> c;
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / g.M, m = nm % g.M;
      for (int64_t q = 0; q < g.Lq; ++q) {
        const int64_t row = (n * g.Lq + q) * g.M + m;
        const scalar_t* grad_out = grad_output + row * g.D;
        const scalar_t* loc = locations + row * g.L * g.P * 2;
        const scalar_t* w = weights + row * g.L * g.P;
        scalar_t* grad_loc = grad_locations + row * g.L * g.P * 2;
        scalar_t* grad_w = grad_weights + row * g.L * g.P;
        for (int64_t l = 0; l < g.L; ++l) {
          const int64_t H = hw[2 * l], W = hw[2 * l + 1];
          const scalar_t* level_value = value + ((n * g.S + starts[l]) * g.M + m) * g.D;
          for (int64_t p = 0; p < g.P; ++p, loc += 2, grad_loc += 2, ++w, ++grad_w) {
            if (!bilinear_corners(level_value, starts[l], H, W, loc[0], loc[1], token_stride,
                                  zero_row.data(), c))
              continue;
            const scalar_t *v0 = c.row[0], *v1 = c.row[1], *v2 = c.row[2], *v3 = c.row[3];
            const scalar_t b0 = c.hy * c.hx, b1 = c.hy * c.lx, b2 = c.ly * c.hx, b3 = c.ly * c.lx;
            // d(sampled)/dx = hy (v1 - v0) + ly (v3 - v2); d(sampled)/dy = hx (v2 - v0) + lx (v3 - v1)
            scalar_t sum_v[kLanes] = {}, sum_x[kLanes] = {}, sum_y[kLanes] = {};
            int64_t d = 0;
            for (; d + kLanes <= g.D; d += kLanes) {
              for (int64_t k = 0; k < kLanes; ++k) {
                const int64_t i = d + k;
                const scalar_t go = grad_out[i];
                sum_v[k] += go * (b0 * v0[i] + b1 * v1[i] + b2 * v2[i] + b3 * v3[i]);
                sum_x[k] += go * (c.hy * (v1[i] - v0[i]) + c.ly * (v3[i] - v2[i]));
                sum_y[k] += go * (c.hx * (v2[i] - v0[i]) + c.lx * (v3[i] - v1[i]));
              }
            }
            for (; d < g.D; ++d) {
              const scalar_t go = grad_out[d];
              sum_v[0] += go * (b0 * v0[d] + b1 * v1[d] + b2 * v2[d] + b3 * v3[d]);
              sum_x[0] += go * (c.hy * (v1[d] - v0[d]) + c.ly * (v3[d] - v2[d]));
              sum_y[0] += go * (c.hx * (v2[d] - v0[d]) + c.lx * (v3[d] - v1[d]));
            }
            scalar_t total_v = 0, total_x = 0, total_y = 0;
            for (int64_t k = 0; k < kLanes; ++k) {
              total_v += sum_v[k];
              total_x += sum_x[k];
              total_y += sum_y[k];
            }
            *grad_w = total_v;
            grad_loc[0] = *w * total_x * W;
            grad_loc[1] = *w * total_y * H;
            const scalar_t corner_weight[4] = {b0, b1, b2, b3};
            for (int k = 0; k < 4; ++k) {
              if (c.token[k] < 0) continue;
              const scalar_t a = *w * corner_weight[k];
              scalar_t* gv = grad_value + ((n * g.S + c.token[k]) * g.M + m) * g.D;
              for (int64_t i = 0; i < g.D; ++i) gv[i] += a * grad_out[i];
            }
          }
        }
      }
    }
  });
}

at::Tensor ms_deform_attn_cpu_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const Geometry g = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights);
  auto output = at::zeros({g.N, g.Lq, g.M * g.D}, value.options());
  if (output.numel() == 0) return output;
  const auto value_c = value.contiguous();
  const auto shapes = spatial_shapes.to(at::kLong).contiguous();
  const auto starts = level_start_index.to(at::kLong).contiguous();
  const auto locations = sampling_locations.contiguous();
  const auto weights = attention_weights.contiguous();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_forward", [&] {
    forward_kernel<scalar_t>(g, value_c.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
                             starts.data_ptr<int64_t>(), locations.data_ptr<scalar_t>(),
                             weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>());
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cpu_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const Geometry g = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == g.N && grad_output.size(1) == g.Lq &&
                  grad_output.size(2) == g.M * g.D,
              "ms_deform_attn: grad_output must be (N, Lq, M*D), got ", grad_output.sizes());
  auto grad_value = at::zeros_like(value, at::MemoryFormat::Contiguous);
  auto grad_locations = at::zeros_like(sampling_locations, at::MemoryFormat::Contiguous);
  auto grad_weights = at::zeros_like(attention_weights, at::MemoryFormat::Contiguous);
  if (grad_locations.numel() == 0 || value.numel() == 0)
    return {grad_value, grad_locations, grad_weights};
  const auto value_c = value.contiguous();
  const auto shapes = spatial_shapes.to(at::kLong).contiguous();
  const auto starts = level_start_index.to(at::kLong).contiguous();
  const auto locations = sampling_locations.contiguous();
  const auto weights = attention_weights.contiguous();
  const auto grad_out = grad_output.to(value.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu_backward", [&] {
    backward_kernel<scalar_t>(g, value_c.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
                              starts.data_ptr<int64_t>(), locations.data_ptr<scalar_t>(),
                              weights.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                              grad_value.data_ptr<scalar_t>(), grad_locations.data_ptr<scalar_t>(),
                              grad_weights.data_ptr<scalar_t>());
  });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_detr, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu_forward);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_cpu_backward);
}
