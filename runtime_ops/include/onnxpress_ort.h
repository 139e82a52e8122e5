// Single include point for ONNX Runtime's C/C++ API.
//
// A custom-op library is not linked against onnxruntime: ORT hands its API table to
// RegisterCustomOps, so the C++ wrappers must not look it up at static-init time.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <string>

namespace onnxpress {

// The OrtApi version this library is compiled against (17 with the default ORT 1.17 headers).
// It is what we request from ORT at registration, so the library loads in any ORT >= 1.<version>.
constexpr uint32_t kOrtApiVersion = ORT_API_VERSION;

constexpr const char* kDomain = "onnxpress";

// User-facing errors thrown inside kernels; converted to an OrtStatus at the C boundary.
inline Ort::Exception InvalidArgument(std::string message) {
  return Ort::Exception("onnxpress.Attention: " + message, ORT_INVALID_ARGUMENT);
}

}  // namespace onnxpress
