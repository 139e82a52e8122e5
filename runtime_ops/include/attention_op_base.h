// The onnxpress.Attention schema, shared by the CPU and CUDA registrations.
//
// ORT builds one ONNX schema per (domain, op name) from these callbacks, so both execution
// providers must describe identical inputs and outputs; only the kernel differs.
#pragma once

#include <exception>

#include "attention_io.h"

namespace onnxpress {

// Runs `body`, turning exceptions into an OrtStatus: exceptions must not cross the C ABI.
template <typename Body>
OrtStatusPtr GuardedCall(Body&& body) noexcept {
  const OrtApi& api = Ort::GetApi();
  try {
    body();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api.CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_FAIL, (std::string("onnxpress.Attention: ") + e.what()).c_str());
  } catch (...) {
    return api.CreateStatus(ORT_FAIL, "onnxpress.Attention: unknown error");
  }
}

template <typename TOp, typename TKernel>
struct AttentionOpBase : Ort::CustomOpBase<TOp, TKernel, /*WithStatus=*/true> {
  AttentionOpBase() {
    // Set directly rather than through Ort::ShapeInferContext: its SetOutputShape in the 1.17
    // headers writes 1 for every static dimension.
    OrtCustomOp::InferOutputShapeFn = [](const OrtCustomOp*, OrtShapeInferContext* ctx) -> OrtStatusPtr {
      return InferAttentionOutputShape(Ort::GetApi(), ctx);
    };
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    return GuardedCall([&] { *kernel = new TKernel(ReadAttentionAttrs(info)); });
  }

  const char* GetName() const { return "Attention"; }

  size_t GetInputTypeCount() const { return kNumAttentionInputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    // The mask accepts several element types; UNDEFINED leaves it unconstrained for ORT and
    // BindAttentionCall checks it.
    return index == kAttentionMask ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED
                                   : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index <= kValue ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }

  size_t GetOutputTypeCount() const { return kNumAttentionOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t /*index*/) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == kOutput ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

}  // namespace onnxpress
