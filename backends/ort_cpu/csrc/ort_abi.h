// The part of onnxruntime's C ABI that dmpq's custom-op library uses, declared by us.
//
// onnxruntime loads a custom-op library by calling its exported `RegisterCustomOps(options, api_base)`.
// `api_base->GetApi(1)` returns the function table of C API version 1. onnxruntime keeps that
// table's first entries fixed for ever (newer versions only append), so a library that asks for
// version 1 and calls only version-1 entries runs on every onnxruntime since 1.0, including the
// 1.32 that dmpq targets. We name only the entries we call, by their position in the version-1
// table; `self_check` in dmpq_moe.cc verifies the table at registration (a status made with
// CreateStatus must read back its code and message) before anything else is called.
//
// One later entry is used where the running onnxruntime is new enough to have it (its version string
// is read at registration): KernelContext_ParallelFor (1.17 on), which runs a loop on the session's
// intra-op threads.
//
// Ops are registered with the version-8 custom-op record (`OrtCustomOpV8`): version 1's callbacks
// plus the two that say whether each input and output is required, which onnxruntime 1.32 calls
// whatever the record's version. Such an op reports errors by throwing a C++ exception from
// KernelCompute, which onnxruntime turns into a failed Run with the exception's message (its own
// C++ wrapper does the same).
#pragma once

#include <cstddef>
#include <cstdint>

namespace dmpq_ort {

struct OrtStatus;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;

// ONNX's TensorProto element types, as onnxruntime numbers them.
enum ElementType : int {
  kUndefined = 0, kFloat = 1, kUInt8 = 2, kInt8 = 3, kInt64 = 7, kFloat16 = 10,
};

// Positions in the version-1 function table (entries 0-101 are frozen).
enum ApiEntry : int {
  kCreateStatus = 0,
  kGetErrorCode = 1,
  kGetErrorMessage = 2,
  kCreateCustomOpDomain = 26,
  kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetTensorElementType = 60,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttributeInt64 = 86,
  kKernelContextGetInputCount = 88,
  kKernelContextGetInput = 90,
  kKernelContextGetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTensorTypeAndShapeInfo = 99,
  kVersion1Entries = 102,
  // Appended later: the operator's thread pool (onnxruntime 1.17 and later; checked by version string).
  kKernelContextParallelFor = 274,
  kEntriesUsed = 275,
};

struct ApiTable {
  void* entry[kEntriesUsed];
};

struct ApiBase {
  const ApiTable* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

enum Characteristic : int { kRequired = 0, kOptional = 1 };

// The version-8 custom-op record: a version number, then these callbacks in this order.
struct OrtCustomOpV8 {
  uint32_t version;
  void* (*CreateKernel)(OrtCustomOpV8* op, const ApiTable* api, const OrtKernelInfo* info);
  const char* (*GetName)(OrtCustomOpV8* op);
  const char* (*GetExecutionProviderType)(OrtCustomOpV8* op);
  ElementType (*GetInputType)(OrtCustomOpV8* op, size_t index);
  size_t (*GetInputTypeCount)(OrtCustomOpV8* op);
  ElementType (*GetOutputType)(OrtCustomOpV8* op, size_t index);
  size_t (*GetOutputTypeCount)(OrtCustomOpV8* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* kernel);
  Characteristic (*GetInputCharacteristic)(const OrtCustomOpV8* op, size_t index);
  Characteristic (*GetOutputCharacteristic)(const OrtCustomOpV8* op, size_t index);
};

// Typed calls into the table.
class Api {
 public:
  explicit Api(const ApiTable* table) : t_(table) {}

  OrtStatus* CreateStatus(int code, const char* msg) const {
    return call<OrtStatus* (*)(int, const char*)>(kCreateStatus)(code, msg);
  }
  int GetErrorCode(const OrtStatus* s) const { return call<int (*)(const OrtStatus*)>(kGetErrorCode)(s); }
  const char* GetErrorMessage(const OrtStatus* s) const {
    return call<const char* (*)(const OrtStatus*)>(kGetErrorMessage)(s);
  }
  void ReleaseStatus(OrtStatus* s) const { call<void (*)(OrtStatus*)>(kReleaseStatus)(s); }
  OrtStatus* CreateCustomOpDomain(const char* name, OrtCustomOpDomain** out) const {
    return call<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(kCreateCustomOpDomain)(name, out);
  }
  OrtStatus* CustomOpDomainAdd(OrtCustomOpDomain* d, OrtCustomOpV8* op) const {
    return call<OrtStatus* (*)(OrtCustomOpDomain*, OrtCustomOpV8*)>(kCustomOpDomainAdd)(d, op);
  }
  OrtStatus* AddCustomOpDomain(OrtSessionOptions* o, OrtCustomOpDomain* d) const {
    return call<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(kAddCustomOpDomain)(o, d);
  }
  OrtStatus* KernelInfoGetAttributeInt64(const OrtKernelInfo* info, const char* name, int64_t* out) const {
    return call<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(kKernelInfoGetAttributeInt64)(
        info, name, out);
  }
  OrtStatus* KernelContextGetInputCount(const OrtKernelContext* c, size_t* out) const {
    return call<OrtStatus* (*)(const OrtKernelContext*, size_t*)>(kKernelContextGetInputCount)(c, out);
  }
  OrtStatus* KernelContextGetInput(const OrtKernelContext* c, size_t i, const OrtValue** out) const {
    return call<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(kKernelContextGetInput)(c, i, out);
  }
  OrtStatus* KernelContextGetOutput(OrtKernelContext* c, size_t i, const int64_t* dims, size_t n,
                                    OrtValue** out) const {
    return call<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(
        kKernelContextGetOutput)(c, i, dims, n, out);
  }
  OrtStatus* GetTensorMutableData(OrtValue* v, void** out) const {
    return call<OrtStatus* (*)(OrtValue*, void**)>(kGetTensorMutableData)(v, out);
  }
  OrtStatus* GetTensorTypeAndShape(const OrtValue* v, OrtTensorTypeAndShapeInfo** out) const {
    return call<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(kGetTensorTypeAndShape)(v, out);
  }
  OrtStatus* GetTensorElementType(const OrtTensorTypeAndShapeInfo* i, int* out) const {
    return call<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int*)>(kGetTensorElementType)(i, out);
  }
  OrtStatus* GetDimensionsCount(const OrtTensorTypeAndShapeInfo* i, size_t* out) const {
    return call<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(kGetDimensionsCount)(i, out);
  }
  OrtStatus* GetDimensions(const OrtTensorTypeAndShapeInfo* i, int64_t* dims, size_t n) const {
    return call<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(kGetDimensions)(i, dims, n);
  }
  void ReleaseTensorTypeAndShapeInfo(OrtTensorTypeAndShapeInfo* i) const {
    call<void (*)(OrtTensorTypeAndShapeInfo*)>(kReleaseTensorTypeAndShapeInfo)(i);
  }
  OrtStatus* KernelContextParallelFor(const OrtKernelContext* c, void (*fn)(void*, size_t), size_t total,
                                      size_t num_batch, void* data) const {
    return call<OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*)>(
        kKernelContextParallelFor)(c, fn, total, num_batch, data);
  }

 private:
  template <typename F>
  F call(ApiEntry e) const { return reinterpret_cast<F>(t_->entry[e]); }
  const ApiTable* t_;
};

}  // namespace dmpq_ort
