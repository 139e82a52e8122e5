// CUDA-EP registration of onnxpress.Attention (same schema as the CPU op).
#pragma once

#include "attention_op_base.h"

namespace onnxpress {

struct AttentionCudaKernel {
  explicit AttentionCudaKernel(const AttentionAttrs& attrs) : attrs_(attrs) {}
  OrtStatusPtr ComputeV2(OrtKernelContext* context) const;
  AttentionAttrs attrs_;
};

struct AttentionCudaOp : AttentionOpBase<AttentionCudaOp, AttentionCudaKernel> {
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
};

}  // namespace onnxpress
