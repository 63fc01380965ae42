// Shape validation shared by the CPU and CUDA kernels of sparse_detr::ms_deform_attn.
#pragma once

#include <ATen/ATen.h>

#include "ms_deform_attn_cpu_kernel.h"  // Geometry

namespace sparse_detr {

// Checks ranks and sizes of the op's inputs. Level bounds are checked when the shapes live on the
// host (reading device tensors here would synchronize every call; the CUDA kernels guard them).
inline Geometry check_geometry(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index,
                               const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "ms_deform_attn: level_start_index must be (L,) = (", L, ",), got ",
              level_start_index.sizes());
  TORCH_CHECK(!at::isFloatingType(spatial_shapes.scalar_type()) &&
                  !at::isFloatingType(level_start_index.scalar_type()),
              "ms_deform_attn: spatial_shapes and level_start_index must be integer tensors, got ",
              spatial_shapes.scalar_type(), " and ", level_start_index.scalar_type());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ",
              sampling_locations.sizes());
  const Geometry g{value.size(0), value.size(1), value.size(2), value.size(3),
                   sampling_locations.size(1), L, sampling_locations.size(4)};
  TORCH_CHECK(sampling_locations.size(0) == g.N && sampling_locations.size(2) == g.M &&
                  sampling_locations.size(3) == L,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(),
              " do not match value ", value.sizes(), " and ", L, " levels");
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = ",
              sampling_locations.sizes().slice(0, 5), ", got ", attention_weights.sizes());
  if (spatial_shapes.is_cpu() && level_start_index.is_cpu()) {
    const auto shapes = spatial_shapes.to(at::kLong).contiguous();
    const auto starts = level_start_index.to(at::kLong).contiguous();
    const std::string error = level_error(g, shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>());
    TORCH_CHECK(error.empty(), "ms_deform_attn: ", error);
  }
  return g;
}

}  // namespace sparse_detr
