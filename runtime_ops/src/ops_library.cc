// Entry points of libonnxpress_ops.so: ORT's RegisterCustomOps and a version probe.
//
// Everything else in the library has hidden visibility, so these are its only exports.
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "attention_cpu.h"
#include "onnxpress_ort.h"
#ifdef ONNXPRESS_WITH_CUDA
#include "attention_cuda.h"
#endif

#define ONNXPRESS_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// Sessions keep raw pointers to the domains they were given, so domains live as long as the
// library stays loaded.
std::vector<Ort::CustomOpDomain>& Domains() {
  static std::vector<Ort::CustomOpDomain> domains;
  return domains;
}
std::mutex domains_mutex;

OrtStatus* AddDomain(OrtSessionOptions* options) {
  static const onnxpress::AttentionCpuOp attention_cpu;
#ifdef ONNXPRESS_WITH_CUDA
  static const onnxpress::AttentionCudaOp attention_cuda;
#endif
  return onnxpress::GuardedCall([&] {
    Ort::CustomOpDomain domain{onnxpress::kDomain};
    domain.Add(&attention_cpu);
#ifdef ONNXPRESS_WITH_CUDA
    domain.Add(&attention_cuda);
#endif
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(domain);
    std::lock_guard<std::mutex> lock(domains_mutex);
    Domains().push_back(std::move(domain));
  });
}

}  // namespace

ONNXPRESS_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(onnxpress::kOrtApiVersion);
  if (api == nullptr) {
    // Version 1 of the API always exists and is enough to report the problem.
    const std::string message = "libonnxpress_ops was built for ONNX Runtime API " +
                                std::to_string(onnxpress::kOrtApiVersion) + " but this onnxruntime is " +
                                api_base->GetVersionString() + ": upgrade onnxruntime to >= 1." +
                                std::to_string(onnxpress::kOrtApiVersion);
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);
  return AddDomain(options);
}

// The OrtApi version the library requests; read by onnxpress.runtime_ops via ctypes.
ONNXPRESS_EXPORT int OnnxpressOpsApiVersion() { return static_cast<int>(onnxpress::kOrtApiVersion); }

// 1 when the CUDA kernels are compiled in.
ONNXPRESS_EXPORT int OnnxpressOpsHasCuda() {
#ifdef ONNXPRESS_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}
