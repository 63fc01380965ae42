// Multi-scale deformable attention: the CPU forward kernel on plain arrays, shared by the torch op
// (ms_deform_attn_cpu.cpp) and the onnxruntime custom op (ms_deform_attn_onnxruntime.cpp). Nothing of
// torch here: the onnxruntime library does not link it.
//
// out[n, q, m*D + d] = sum_{l, p} w[n, q, m, l, p] * bilinear(value_l[n, :, :, m, d], x, y)
// with x = loc_x * W_l - 0.5, y = loc_y * H_l - 0.5 (grid_sample, align_corners=False) and zeros
// outside the map. value is (N, S, M, D) with the L levels flattened row-major and concatenated.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace sparse_detr {

// Sizes of one call: batch, tokens, heads, channels per head, queries, levels, points.
struct Geometry {
  int64_t N, S, M, D, Lq, L, P;
};

// The four bilinear corners of one sampling point: row pointers into the level's values (or into a
// zero row when the corner is outside the map) and their interpolation weights.
template <typename scalar_t>
struct Corners {
  const scalar_t* row[4];
  int64_t token[4];  // -1 when outside the map
  scalar_t lx, ly, hx, hy;
};

// Returns false when no corner is inside the map (the point contributes nothing).
template <typename scalar_t>
inline bool bilinear_corners(const scalar_t* level_value, int64_t level_start, int64_t H, int64_t W,
                             scalar_t loc_x, scalar_t loc_y, int64_t token_stride,
                             const scalar_t* zero_row, Corners<scalar_t>& c) {
  const scalar_t x = loc_x * W - scalar_t(0.5);
  const scalar_t y = loc_y * H - scalar_t(0.5);
  // Also rejects NaN. Inside this range floor() fits int64 and one corner at least is on the map.
  if (!(x >= -1 && x < W && y >= -1 && y < H)) return false;
  const scalar_t x0f = std::floor(x), y0f = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  c.lx = x - x0f;
  c.ly = y - y0f;
  c.hx = 1 - c.lx;
  c.hy = 1 - c.ly;
  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
  for (int k = 0; k < 4; ++k) {
    const bool inside = xs[k] >= 0 && xs[k] < W && ys[k] >= 0 && ys[k] < H;
    c.token[k] = inside ? level_start + ys[k] * W + xs[k] : -1;
    c.row[k] = inside ? level_value + (ys[k] * W + xs[k]) * token_stride : zero_row;
  }
  return true;
}

// Why the L levels (H, W) = hw[2l], hw[2l+1] starting at start[l] do not tile value's S tokens, or "" when
// they do. Shared by the torch op's checks and the onnxruntime op, which word their errors alike.
inline std::string level_error(const Geometry& g, const int64_t* hw, const int64_t* start) {
  int64_t tokens = 0;
  for (int64_t l = 0; l < g.L; ++l) {
    if (hw[2 * l] < 0 || hw[2 * l + 1] < 0 || start[l] < 0 || start[l] + hw[2 * l] * hw[2 * l + 1] > g.S)
      return "level " + std::to_string(l) + " of shape (" + std::to_string(hw[2 * l]) + ", " +
             std::to_string(hw[2 * l + 1]) + ") starting at " + std::to_string(start[l]) +
             " does not fit in value's S = " + std::to_string(g.S);
    tokens += hw[2 * l] * hw[2 * l + 1];
  }
  if (tokens != g.S)
    return "spatial_shapes cover " + std::to_string(tokens) + " tokens but value has S = " + std::to_string(g.S);
  return "";
}

// Output rows (n, q, m) are independent: a caller splits [0, rows) among its threads.
inline int64_t forward_rows(const Geometry& g) { return g.N * g.Lq * g.M; }

// Rows per task that keep a task's work near 4096 multiply-adds.
inline int64_t forward_grain(const Geometry& g) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.L * g.P * g.D));
}

// Adds rows [begin, end) of the op's output into output (N, Lq, M, D) == (N, Lq, M*D), zeroed by the caller.
template <typename scalar_t>
void forward_rows_kernel(const Geometry& g, const scalar_t* value, const int64_t* hw,
                         const int64_t* starts, const scalar_t* locations, const scalar_t* weights,
                         scalar_t* output, int64_t begin, int64_t end) {
  const int64_t token_stride = g.M * g.D;
  const std::vector<scalar_t> zero_row(g.D, scalar_t(0));
  Corners<scalar_t> c;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t m = row % g.M;
    const int64_t n = row / (g.Lq * g.M);
    scalar_t* out = output + row * g.D;
    const scalar_t* loc = locations + row * g.L * g.P * 2;
    const scalar_t* w = weights + row * g.L * g.P;
    for (int64_t l = 0; l < g.L; ++l) {
      const int64_t H = hw[2 * l], W = hw[2 * l + 1];
      const scalar_t* level_value = value + ((n * g.S + starts[l]) * g.M + m) * g.D;
      for (int64_t p = 0; p < g.P; ++p, loc += 2, ++w) {
        if (!bilinear_corners(level_value, starts[l], H, W, loc[0], loc[1], token_stride,
                              zero_row.data(), c))
          continue;
        const scalar_t a0 = *w * c.hy * c.hx, a1 = *w * c.hy * c.lx;
        const scalar_t a2 = *w * c.ly * c.hx, a3 = *w * c.ly * c.lx;
        const scalar_t *v0 = c.row[0], *v1 = c.row[1], *v2 = c.row[2], *v3 = c.row[3];
        for (int64_t d = 0; d < g.D; ++d)
          out[d] += a0 * v0[d] + a1 * v1[d] + a2 * v2[d] + a3 * v3[d];
      }
    }
  }
}

}  // namespace sparse_detr
