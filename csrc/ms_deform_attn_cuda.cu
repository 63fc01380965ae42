// Multi-scale deformable attention: CUDA kernels for the sparse_detr::ms_deform_attn op.
//
// out[n, q, m*D + d] = sum_{l, p} w[n, q, m, l, p] * bilinear(value_l[n, :, :, m, d], x, y)
// with x = loc_x * W_l - 0.5, y = loc_y * H_l - 0.5 (grid_sample, align_corners=False) and zeros
// outside the map. value is (N, S, M, D) with the L levels flattened row-major and concatenated;
// sampling_locations is (N, Lq, M, L, P, 2) as normalized (x, y); attention_weights is
// (N, Lq, M, L, P); the output is (N, Lq, M*D), i.e. (N, Lq, M, D).
//
// One warp owns one output row (n, q, m): its lanes cover the D channels (lane, lane + 32, ...), so
// any D works and every corner read is a coalesced run of D values. Every lane computes the same
// sampling geometry from the same (broadcast) location, so all control flow outside the channel
// loops is warp-uniform and the backward can reduce over channels with warp shuffles.
//
// Dtypes: value, grad_output and the output are scalar_t (float, double, half, bfloat16);
// locations, weights and their gradients are coord_t (float for half/bfloat16, else scalar_t);
// arithmetic runs in acc_t = at::opmath_type<scalar_t>. grad_value is accumulated with atomics in
// acc_t.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h, which needs the cuSPARSE/cuBLAS headers
// that minimal CUDA toolkits lack.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ms_deform_attn_checks.h"

#include <algorithm>
#include <tuple>
#include <type_traits>

namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
// Enough blocks to fill any GPU many times over; the grid-stride loop covers the remaining rows.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

using sparse_detr::Geometry;

// Where one sampling point falls on a level: the flat (y * W + x) tokens of its corners in the
// order (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1), which of them lie on the map, and
// the bilinear fractions (lx, ly towards the +1 corners, hx = 1 - lx, hy = 1 - ly).
template <typename acc_t>
struct Sample {
  int64_t token[4];
  bool inside[4];
  acc_t lx, ly, hx, hy;
};

// Returns false when no corner is on the map: the point then contributes nothing, gradients
// included. The test also rejects NaN, and inside its range floor() converts to int64 safely.
template <typename acc_t>
__device__ __forceinline__ bool locate(acc_t loc_x, acc_t loc_y, int64_t H, int64_t W,
                                       Sample<acc_t>& s) {
  const acc_t x = loc_x * static_cast<acc_t>(W) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(H) - acc_t(0.5);
  if (!(x >= acc_t(-1) && x < static_cast<acc_t>(W) && y >= acc_t(-1) &&
        y < static_cast<acc_t>(H)))
    return false;
  const acc_t x0f = floor(x), y0f = floor(y);
  const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  // Same expressions as grid_sample's weights, so both round alike.
  s.lx = x - x0f;
  s.ly = y - y0f;
  s.hx = (x0f + acc_t(1)) - x;
  s.hy = (y0f + acc_t(1)) - y;
  // x >= -1 gives x0 >= -1, so x0 + 1 >= 0. The upper bounds are rechecked in integers because
  // the float comparison with W may round (W > 2^24 in float).
  const bool x0_in = x0 >= 0 && x0 < W, x1_in = x0 + 1 < W;
  const bool y0_in = y0 >= 0 && y0 < H, y1_in = y0 + 1 < H;
  s.inside[0] = x0_in && y0_in;
  s.inside[1] = x1_in && y0_in;
  s.inside[2] = x0_in && y1_in;
  s.inside[3] = x1_in && y1_in;
  s.token[0] = y0 * W + x0;
  s.token[1] = s.token[0] + 1;
  s.token[2] = s.token[0] + W;
  s.token[3] = s.token[0] + W + 1;
  return true;
}

// Reads one level's (H, W, start). spatial_shapes living on the device are not checked on the
// host (that would synchronize every call), so guard the gathers against inconsistent shapes here.
__device__ __forceinline__ void level_geometry(const int64_t* __restrict__ shapes,
                                               const int64_t* __restrict__ starts, int64_t l,
                                               int64_t S, int64_t& H, int64_t& W, int64_t& start) {
  H = shapes[2 * l];
  W = shapes[2 * l + 1];
  start = starts[l];
  CUDA_KERNEL_ASSERT_MSG(H >= 0 && W >= 0 && start >= 0 && start + H * W <= S,
                         "ms_deform_attn: spatial_shapes / level_start_index exceed value's S");
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ int64_t first_warp() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
}

__device__ __forceinline__ int64_t warp_count() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
}

// K channels per lane are kept in registers, so D <= 32 * K takes a single pass over the points.
template <typename scalar_t, typename coord_t, int K>
__global__ void __launch_bounds__(kThreads)
    ms_deform_attn_forward_kernel(const scalar_t* __restrict__ value,
                                  const int64_t* __restrict__ shapes,
                                  const int64_t* __restrict__ starts,
                                  const coord_t* __restrict__ locations,
                                  const coord_t* __restrict__ weights,
                                  scalar_t* __restrict__ output, const Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = g.N * g.Lq * g.M;
  const int64_t token_stride = g.M * g.D;
  const int64_t points = g.L * g.P;
  for (int64_t row = first_warp(); row < rows; row += warp_count()) {
    const int64_t n = row / (g.Lq * g.M), m = row % g.M;
    const scalar_t* value_nm = value + n * g.S * token_stride + m * g.D;
    const coord_t* loc = locations + row * points * 2;
    const coord_t* attn = weights + row * points;
    for (int64_t base = lane; base < g.D + lane; base += kWarp * K) {
      acc_t acc[K];
#pragma unroll
      for (int k = 0; k < K; ++k) acc[k] = acc_t(0);
      for (int64_t l = 0; l < g.L; ++l) {
        int64_t H, W, start;
        level_geometry(shapes, starts, l, g.S, H, W, start);
        const scalar_t* level = value_nm + start * token_stride;
        for (int64_t point = l * g.P; point < (l + 1) * g.P; ++point) {
          Sample<acc_t> s;
          if (!locate<acc_t>(loc[2 * point], loc[2 * point + 1], H, W, s)) continue;
          const acc_t w = attn[point];
          const acc_t corner_weight[4] = {w * s.hy * s.hx, w * s.hy * s.lx, w * s.ly * s.hx,
                                          w * s.ly * s.lx};
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (!s.inside[c]) continue;
            const scalar_t* v = level + s.token[c] * token_stride;
#pragma unroll
            for (int k = 0; k < K; ++k) {
              const int64_t d = base + k * kWarp;
              if (d < g.D) acc[k] += corner_weight[c] * static_cast<acc_t>(v[d]);
            }
          }
        }
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t d = base + k * kWarp;
        if (d < g.D) output[row * g.D + d] = static_cast<scalar_t>(acc[k]);
      }
    }
  }
}

// grad_value is scattered with atomics (many queries sample the same token). grad_locations and
// grad_weights of a row belong to its warp alone: lane 0 adds each channel pass's reduced sum into
// them (they start at zero), so D > 32 * K needs no atomics there either.
template <typename scalar_t, typename coord_t, int K>
__global__ void __launch_bounds__(kThreads)
    ms_deform_attn_backward_kernel(const scalar_t* __restrict__ value,
                                   const int64_t* __restrict__ shapes,
                                   const int64_t* __restrict__ starts,
                                   const coord_t* __restrict__ locations,
                                   const coord_t* __restrict__ weights,
                                   const scalar_t* __restrict__ grad_output,
                                   at::opmath_type<scalar_t>* __restrict__ grad_value,
                                   coord_t* __restrict__ grad_locations,
                                   coord_t* __restrict__ grad_weights, const Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = g.N * g.Lq * g.M;
  const int64_t token_stride = g.M * g.D;
  const int64_t points = g.L * g.P;
  for (int64_t row = first_warp(); row < rows; row += warp_count()) {
    const int64_t n = row / (g.Lq * g.M), m = row % g.M;
    const int64_t nm_offset = n * g.S * token_stride + m * g.D;
    const coord_t* loc = locations + row * points * 2;
    const coord_t* attn = weights + row * points;
    coord_t* grad_loc = grad_locations + row * points * 2;
    coord_t* grad_attn = grad_weights + row * points;
    for (int64_t base = lane; base < g.D + lane; base += kWarp * K) {
      acc_t go[K];  // this lane's grad_output channels; zero past D so they add nothing
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t d = base + k * kWarp;
        go[k] = d < g.D ? static_cast<acc_t>(grad_output[row * g.D + d]) : acc_t(0);
      }
      for (int64_t l = 0; l < g.L; ++l) {
        int64_t H, W, start;
        level_geometry(shapes, starts, l, g.S, H, W, start);
        const int64_t level_offset = nm_offset + start * token_stride;
        for (int64_t point = l * g.P; point < (l + 1) * g.P; ++point) {
          Sample<acc_t> s;
          // Warp-uniform: every lane sees the same location, so the shuffles below stay converged.
          if (!locate<acc_t>(loc[2 * point], loc[2 * point + 1], H, W, s)) continue;
          const acc_t w = attn[point];
          const acc_t corner_weight[4] = {s.hy * s.hx, s.hy * s.lx, s.ly * s.hx, s.ly * s.lx};
          // This lane's share of sum_d go[d] * sampled[d] and of its derivatives along x and y.
          acc_t grad_w = 0, grad_x = 0, grad_y = 0;
#pragma unroll
          for (int k = 0; k < K; ++k) {
            const int64_t d = base + k * kWarp;
            if (d >= g.D) continue;
            acc_t v[4];
#pragma unroll
            for (int c = 0; c < 4; ++c)
              v[c] = s.inside[c]
                         ? static_cast<acc_t>(value[level_offset + s.token[c] * token_stride + d])
                         : acc_t(0);
            grad_w += go[k] * (corner_weight[0] * v[0] + corner_weight[1] * v[1] +
                               corner_weight[2] * v[2] + corner_weight[3] * v[3]);
            grad_x += go[k] * (s.hy * (v[1] - v[0]) + s.ly * (v[3] - v[2]));
            grad_y += go[k] * (s.hx * (v[2] - v[0]) + s.lx * (v[3] - v[1]));
            const acc_t scaled = w * go[k];
#pragma unroll
            for (int c = 0; c < 4; ++c)
              if (s.inside[c])
                atomicAdd(grad_value + level_offset + s.token[c] * token_stride + d,
                          corner_weight[c] * scaled);
          }
          grad_w = warp_sum(grad_w);
          grad_x = warp_sum(grad_x);
          grad_y = warp_sum(grad_y);
          if (lane == 0) {
            grad_attn[point] += static_cast<coord_t>(grad_w);
            // d x / d loc_x = W and d y / d loc_y = H.
            grad_loc[2 * point] += static_cast<coord_t>(w * grad_x * static_cast<acc_t>(W));
            grad_loc[2 * point + 1] += static_cast<coord_t>(w * grad_y * static_cast<acc_t>(H));
          }
        }
      }
    }
  }
}

// Calls f with std::integral_constant<int, K>, K the channels per lane: the smallest of 1, 2, 4
// covering D in one pass, else 8 (several passes over the channels).
template <typename F>
void dispatch_channels_per_lane(int64_t D, F&& f) {
  if (D <= kWarp)
    f(std::integral_constant<int, 1>{});
  else if (D <= 2 * kWarp)
    f(std::integral_constant<int, 2>{});
  else if (D <= 4 * kWarp)
    f(std::integral_constant<int, 4>{});
  else
    f(std::integral_constant<int, 8>{});
}

int64_t num_blocks(int64_t rows) {
  return std::min((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks);
}

at::ScalarType coord_dtype(at::ScalarType value_dtype) {
  return value_dtype == at::kHalf || value_dtype == at::kBFloat16 ? at::kFloat : value_dtype;
}

Geometry check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                      const at::Tensor& attention_weights) {
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (cuda): value must be a CUDA tensor, got ",
              value.device());
  const Geometry g = sparse_detr::check_geometry(value, spatial_shapes, level_start_index,
                                                 sampling_locations, attention_weights);
  TORCH_CHECK(sampling_locations.device() == value.device() &&
                  attention_weights.device() == value.device(),
              "ms_deform_attn (cuda): sampling_locations and attention_weights must be on ",
              value.device(), ", got ", sampling_locations.device(), " and ",
              attention_weights.device());
  const auto expected = coord_dtype(value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == expected &&
                  attention_weights.scalar_type() == expected,
              "ms_deform_attn (cuda): with ", value.scalar_type(),
              " value, sampling_locations and attention_weights must be ", expected,
              " (float32 for float16/bfloat16 value, else value's dtype), got ",
              sampling_locations.scalar_type(), " and ", attention_weights.scalar_type());
  return g;
}

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const Geometry g = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights);
  c10::cuda::CUDAGuard device_guard(value.device());
  const int64_t rows = g.N * g.Lq * g.M;
  if (rows == 0 || g.D == 0) return at::empty({g.N, g.Lq, g.M * g.D}, value.options());
  // Every element is written by the kernel (zero when no point lands on the map).
  auto output = at::empty({g.N, g.Lq, g.M * g.D}, value.options());
  const auto value_c = value.contiguous();
  const auto shapes = spatial_shapes.to(value.device(), at::kLong).contiguous();
  const auto starts = level_start_index.to(value.device(), at::kLong).contiguous();
  const auto locations = sampling_locations.contiguous();
  const auto weights = attention_weights.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, value.scalar_type(),
      "ms_deform_attn_cuda_forward", [&] {
        using coord_t = at::opmath_type<scalar_t>;
        dispatch_channels_per_lane(g.D, [&](auto channels) {
          ms_deform_attn_forward_kernel<scalar_t, coord_t, decltype(channels)::value>
              <<<num_blocks(rows), kThreads, 0, stream>>>(
                  value_c.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
                  starts.data_ptr<int64_t>(), locations.data_ptr<coord_t>(),
                  weights.data_ptr<coord_t>(), output.data_ptr<scalar_t>(), g);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_cuda_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const Geometry g = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights);
  c10::cuda::CUDAGuard device_guard(value.device());
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == g.N && grad_output.size(1) == g.Lq &&
                  grad_output.size(2) == g.M * g.D,
              "ms_deform_attn: grad_output must be (N, Lq, M*D) = (", g.N, ", ", g.Lq, ", ",
              g.M * g.D, "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.device() == value.device(),
              "ms_deform_attn (cuda): grad_output must be on ", value.device(), ", got ",
              grad_output.device());
  const auto acc_dtype = coord_dtype(value.scalar_type());  // opmath type: float or double
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  auto grad_locations = at::zeros(sampling_locations.sizes(), sampling_locations.options());
  auto grad_weights = at::zeros(attention_weights.sizes(), attention_weights.options());
  const int64_t rows = g.N * g.Lq * g.M;
  if (rows > 0 && g.D > 0 && g.L * g.P > 0) {
    // Float atomics make grad_value's summation order vary (as in grid_sample's CUDA backward).
    at::globalContext().alertNotDeterministic("ms_deform_attn_cuda_backward");
    const auto value_c = value.contiguous();
    const auto shapes = spatial_shapes.to(value.device(), at::kLong).contiguous();
    const auto starts = level_start_index.to(value.device(), at::kLong).contiguous();
    const auto locations = sampling_locations.contiguous();
    const auto weights = attention_weights.contiguous();
    const auto grad_out = grad_output.to(value.scalar_type()).contiguous();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::ScalarType::Half, at::ScalarType::BFloat16, value.scalar_type(),
        "ms_deform_attn_cuda_backward", [&] {
          using coord_t = at::opmath_type<scalar_t>;
          using acc_t = at::opmath_type<scalar_t>;
          dispatch_channels_per_lane(g.D, [&](auto channels) {
            ms_deform_attn_backward_kernel<scalar_t, coord_t, decltype(channels)::value>
                <<<num_blocks(rows), kThreads, 0, stream>>>(
                    value_c.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
                    starts.data_ptr<int64_t>(), locations.data_ptr<coord_t>(),
                    weights.data_ptr<coord_t>(), grad_out.data_ptr<scalar_t>(),
                    grad_value.data_ptr<acc_t>(), grad_locations.data_ptr<coord_t>(),
                    grad_weights.data_ptr<coord_t>(), g);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
  }
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_detr, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda_forward);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_cuda_backward);
}
