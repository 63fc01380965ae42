// onnxruntime custom-op library: multi-scale deformable attention for files from `sdetr export` with
// --msda custom (node sparse_detr::MultiScaleDeformableAttention, int64 level tensors, output
// (N, Lq, M*D)) and --msda tensorrt (node trt.plugins::MultiscaleDeformableAttnPlugin_TRT in the layout
// of TensorRT's plugin, int32 level tensors, output (N, Lq, M, D)), so that the TensorRT file can be
// checked on a CPU as well. Both run the CPU kernel of the torch op (ms_deform_attn_cpu_kernel.h),
// in parallel over output rows with OpenMP, in float32.
//
// onnxruntime loads the library with SessionOptions.register_custom_ops_library(path) and calls
// RegisterCustomOps; sparse_detr.ops.onnxruntime_library builds and caches it.

#include "ms_deform_attn_cpu_kernel.h"
#include "onnxruntime_abi.h"

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using sparse_detr::Geometry;

struct Layout {
  const char* domain;
  const char* name;
  ort::ElementType level_type;  // of spatial_shapes and level_start_index
  bool split_heads;             // output (N, Lq, M, D) instead of (N, Lq, M*D)
};

constexpr Layout kCustom{"sparse_detr", "MultiScaleDeformableAttention", ort::kInt64, false};
constexpr Layout kTensorRT{"trt.plugins", "MultiscaleDeformableAttnPlugin_TRT", ort::kInt32, true};

struct Tensor {
  std::vector<int64_t> shape;
  ort::ElementType type;
  void* data;
};

// Calls an OrtApi function that returns a status; a failure becomes an exception with its message.
class Api {
 public:
  explicit Api(const ort::Api* api) : api_(api) {}

  void check(ort::Status* status, const char* what) const {
    if (status == nullptr) return;
    ort::slot<void (*)(ort::Status*)>(api_, ort::kReleaseStatus)(status);
    throw std::runtime_error(std::string("onnxruntime could not ") + what);
  }

  Tensor describe(const ort::Value* value, void* data) const {
    ort::TensorTypeAndShapeInfo* info = nullptr;
    check(ort::slot<ort::Status* (*)(const ort::Value*, ort::TensorTypeAndShapeInfo**)>(
              api_, ort::kGetTensorTypeAndShape)(value, &info),
          "read a tensor's shape");
    Tensor tensor{{}, ort::kUndefined, data};
    std::size_t rank = 0;
    ort::Status* status = ort::slot<ort::Status* (*)(const ort::TensorTypeAndShapeInfo*, std::size_t*)>(
        api_, ort::kGetDimensionsCount)(info, &rank);
    if (status == nullptr) {
      tensor.shape.resize(rank);
      status = ort::slot<ort::Status* (*)(const ort::TensorTypeAndShapeInfo*, int64_t*, std::size_t)>(
          api_, ort::kGetDimensions)(info, tensor.shape.data(), rank);
    }
    if (status == nullptr)
      status = ort::slot<ort::Status* (*)(const ort::TensorTypeAndShapeInfo*, ort::ElementType*)>(
          api_, ort::kGetTensorElementType)(info, &tensor.type);
    ort::slot<void (*)(ort::TensorTypeAndShapeInfo*)>(api_, ort::kReleaseTensorTypeAndShapeInfo)(info);
    check(status, "read a tensor's shape");
    return tensor;
  }

  Tensor input(ort::KernelContext* context, std::size_t index) const {
    const ort::Value* value = nullptr;
    check(ort::slot<ort::Status* (*)(const ort::KernelContext*, std::size_t, const ort::Value**)>(
              api_, ort::kKernelContextGetInput)(context, index, &value),
          "get an input");
    return describe(value, data(const_cast<ort::Value*>(value)));
  }

  void* output(ort::KernelContext* context, const std::vector<int64_t>& shape) const {
    ort::Value* value = nullptr;
    check(ort::slot<ort::Status* (*)(ort::KernelContext*, std::size_t, const int64_t*, std::size_t,
                                     ort::Value**)>(api_, ort::kKernelContextGetOutput)(
              context, 0, shape.data(), shape.size(), &value),
          "allocate the output");
    return data(value);
  }

 private:
  void* data(ort::Value* value) const {
    void* pointer = nullptr;
    check(ort::slot<ort::Status* (*)(ort::Value*, void**)>(api_, ort::kGetTensorMutableData)(value, &pointer),
          "reach a tensor's data");
    return pointer;
  }

  const ort::Api* api_;
};

[[noreturn]] void fail(const Layout& layout, const std::string& message) {
  throw std::runtime_error(std::string(layout.name) + ": " + message);
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + ")";
}

// The op's sizes, after checking the inputs as the torch op does (ms_deform_attn_checks.h).
Geometry check_inputs(const Layout& layout, const Tensor& value, const Tensor& shapes, const Tensor& starts,
                      const Tensor& locations, const Tensor& weights, std::vector<int64_t>& hw,
                      std::vector<int64_t>& start) {
  if (value.shape.size() != 4) fail(layout, "value must be (N, S, M, D), got " + shape_text(value.shape));
  if (shapes.shape.size() != 2 || shapes.shape[1] != 2)
    fail(layout, "spatial_shapes must be (L, 2), got " + shape_text(shapes.shape));
  const int64_t L = shapes.shape[0];
  if (starts.shape.size() != 1 || starts.shape[0] != L)
    fail(layout, "level_start_index must be (L,), got " + shape_text(starts.shape));
  if (locations.shape.size() != 6 || locations.shape[5] != 2)
    fail(layout, "sampling_locations must be (N, Lq, M, L, P, 2), got " + shape_text(locations.shape));
  const Geometry g{value.shape[0], value.shape[1], value.shape[2], value.shape[3],
                   locations.shape[1], L, locations.shape[4]};
  if (locations.shape[0] != g.N || locations.shape[2] != g.M || locations.shape[3] != L)
    fail(layout, "sampling_locations " + shape_text(locations.shape) + " do not match value " +
                     shape_text(value.shape) + " and " + std::to_string(L) + " levels");
  const std::vector<int64_t> weight_shape(locations.shape.begin(), locations.shape.begin() + 5);
  if (weights.shape != weight_shape)
    fail(layout, "attention_weights must be " + shape_text(weight_shape) + ", got " + shape_text(weights.shape));
  hw.resize(2 * L);
  start.resize(L);
  for (int64_t i = 0; i < L; ++i) {
    const bool wide = layout.level_type == ort::kInt64;
    start[i] = wide ? static_cast<const int64_t*>(starts.data)[i] : static_cast<const int32_t*>(starts.data)[i];
    for (int k = 0; k < 2; ++k)
      hw[2 * i + k] = wide ? static_cast<const int64_t*>(shapes.data)[2 * i + k]
                           : static_cast<const int32_t*>(shapes.data)[2 * i + k];
  }
  const std::string error = sparse_detr::level_error(g, hw.data(), start.data());
  if (!error.empty()) fail(layout, error);
  return g;
}

struct Kernel {
  Api api;
  const Layout* layout;
};

void compute(void* state, ort::KernelContext* context) {
  const Kernel& kernel = *static_cast<Kernel*>(state);
  const Layout& layout = *kernel.layout;
  const Tensor value = kernel.api.input(context, 0), shapes = kernel.api.input(context, 1),
               starts = kernel.api.input(context, 2), locations = kernel.api.input(context, 3),
               weights = kernel.api.input(context, 4);
  std::vector<int64_t> hw, start;
  const Geometry g = check_inputs(layout, value, shapes, starts, locations, weights, hw, start);
  const std::vector<int64_t> shape = layout.split_heads ? std::vector<int64_t>{g.N, g.Lq, g.M, g.D}
                                                        : std::vector<int64_t>{g.N, g.Lq, g.M * g.D};
  auto* output = static_cast<float*>(kernel.api.output(context, shape));
  const int64_t rows = sparse_detr::forward_rows(g);
  if (rows == 0 || g.D == 0) return;
  std::memset(output, 0, sizeof(float) * rows * g.D);
  const int64_t grain = sparse_detr::forward_grain(g);
  const int64_t tasks = (rows + grain - 1) / grain;
  const auto* value_data = static_cast<const float*>(value.data);
  const auto* location_data = static_cast<const float*>(locations.data);
  const auto* weight_data = static_cast<const float*>(weights.data);
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t begin = task * grain;
    sparse_detr::forward_rows_kernel(g, value_data, hw.data(), start.data(), location_data, weight_data,
                                     output, begin, std::min(rows, begin + grain));
  }
}

template <const Layout& layout>
struct Op : ort::CustomOp {
  Op() : ort::CustomOp{} {
    version = ort::kApiVersion;
    CreateKernel = [](const ort::CustomOp*, const ort::Api* api, const ort::KernelInfo*) -> void* {
      return new Kernel{Api(api), &layout};
    };
    GetName = [](const ort::CustomOp*) { return layout.name; };
    GetExecutionProviderType = [](const ort::CustomOp*) -> const char* { return nullptr; };
    GetInputType = [](const ort::CustomOp*, std::size_t index) {
      return index == 1 || index == 2 ? layout.level_type : ort::kFloat;
    };
    GetInputTypeCount = [](const ort::CustomOp*) -> std::size_t { return 5; };
    GetOutputType = [](const ort::CustomOp*, std::size_t) { return ort::kFloat; };
    GetOutputTypeCount = [](const ort::CustomOp*) -> std::size_t { return 1; };
    KernelCompute = compute;
    KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
    GetInputCharacteristic = [](const ort::CustomOp*, std::size_t) { return 0; };
    GetOutputCharacteristic = [](const ort::CustomOp*, std::size_t) { return 0; };
    GetInputMemoryType = [](const ort::CustomOp*, std::size_t) { return 0; };
  }
};

Op<kCustom> custom_op;
Op<kTensorRT> tensorrt_op;

}  // namespace

// onnxruntime's entry point: adds both ops' domains to the session options. The domains live as long
// as the process (a session may outlive the options it was made with).
extern "C" __attribute__((visibility("default"))) ort::Status* RegisterCustomOps(ort::SessionOptions* options,
                                                                               const ort::ApiBase* base) {
  const ort::Api* api = base->GetApi(ort::kApiVersion);
  if (api == nullptr) return nullptr;  // older than 1.13: nothing can be reported through it
  using CreateDomain = ort::Status* (*)(const char*, ort::CustomOpDomain**);
  using AddOp = ort::Status* (*)(ort::CustomOpDomain*, const ort::CustomOp*);
  using AddDomain = ort::Status* (*)(ort::SessionOptions*, ort::CustomOpDomain*);
  const std::pair<const Layout*, const ort::CustomOp*> ops[] = {{&kCustom, &custom_op}, {&kTensorRT, &tensorrt_op}};
  for (const auto& [layout, op] : ops) {
    ort::CustomOpDomain* domain = nullptr;
    ort::Status* status = ort::slot<CreateDomain>(api, ort::kCreateCustomOpDomain)(layout->domain, &domain);
    if (status == nullptr) status = ort::slot<AddOp>(api, ort::kCustomOpDomainAdd)(domain, op);
    if (status == nullptr) status = ort::slot<AddDomain>(api, ort::kAddCustomOpDomain)(options, domain);
    if (status != nullptr) return status;
  }
  return nullptr;
}
