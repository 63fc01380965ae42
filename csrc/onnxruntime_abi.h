// The part of onnxruntime's C ABI that a custom-op library uses, declared here so that the library
// builds without onnxruntime's headers (its Python wheel ships none).
//
// onnxruntime hands a custom-op library an OrtApiBase; OrtApiBase::GetApi(version) returns the OrtApi
// table of function pointers. The table only ever grows at its end, so a slot's index is fixed for
// every release from the version that introduced it; the slots below all exist in API version 13
// (onnxruntime 1.13), the version this library asks for.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ort {

struct Api;  // OrtApi: read only through slot()
struct Status;
struct Value;
struct KernelInfo;
struct KernelContext;
struct SessionOptions;
struct CustomOpDomain;
struct TensorTypeAndShapeInfo;

constexpr uint32_t kApiVersion = 13;

// ONNX TensorProto element types.
enum ElementType : int { kUndefined = 0, kFloat = 1, kInt32 = 6, kInt64 = 7 };

enum ErrorCode : int { kOk = 0, kFail = 1, kInvalidArgument = 2 };

struct ApiBase {
  const Api* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

// Indices into the OrtApi table.
enum Slot : std::size_t {
  kCreateStatus = 0,           // Status* (ErrorCode, const char* message)
  kCreateCustomOpDomain = 26,  // Status* (const char* domain, CustomOpDomain** out)
  kCustomOpDomainAdd = 27,     // Status* (CustomOpDomain*, const CustomOp*)
  kAddCustomOpDomain = 28,     // Status* (SessionOptions*, CustomOpDomain*)
  kGetTensorMutableData = 51,  // Status* (Value*, void** out)
  kGetTensorElementType = 60,  // Status* (const TensorTypeAndShapeInfo*, ElementType* out)
  kGetDimensionsCount = 61,    // Status* (const TensorTypeAndShapeInfo*, size_t* out)
  kGetDimensions = 62,         // Status* (const TensorTypeAndShapeInfo*, int64_t* out, size_t length)
  kGetTensorTypeAndShape = 65, // Status* (const Value*, TensorTypeAndShapeInfo** out)
  kKernelContextGetInput = 90,   // Status* (const KernelContext*, size_t index, const Value** out)
  kKernelContextGetOutput = 91,  // Status* (KernelContext*, size_t index, const int64_t* dims, size_t count, Value** out)
  kReleaseStatus = 93,                  // void (Status*)
  kReleaseTensorTypeAndShapeInfo = 99,  // void (TensorTypeAndShapeInfo*)
};

template <typename Function>
Function slot(const Api* api, Slot index) {
  return reinterpret_cast<Function>(reinterpret_cast<void* const*>(api)[index]);
}

// OrtCustomOp as of API version 13: onnxruntime reads no field past those its `version` has.
struct CustomOp {
  uint32_t version;
  void* (*CreateKernel)(const CustomOp* op, const Api* api, const KernelInfo* info);
  const char* (*GetName)(const CustomOp* op);
  const char* (*GetExecutionProviderType)(const CustomOp* op);  // nullptr: the CPU provider
  ElementType (*GetInputType)(const CustomOp* op, std::size_t index);
  std::size_t (*GetInputTypeCount)(const CustomOp* op);
  ElementType (*GetOutputType)(const CustomOp* op, std::size_t index);
  std::size_t (*GetOutputTypeCount)(const CustomOp* op);
  void (*KernelCompute)(void* kernel, KernelContext* context);  // errors: a C++ exception
  void (*KernelDestroy)(void* kernel);
  int (*GetInputCharacteristic)(const CustomOp* op, std::size_t index);   // 0: required
  int (*GetOutputCharacteristic)(const CustomOp* op, std::size_t index);  // 0: required
  int (*GetInputMemoryType)(const CustomOp* op, std::size_t index);       // 0: the provider's default
};

}  // namespace ort
