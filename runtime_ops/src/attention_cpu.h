// CPU kernel of onnxpress.Attention: tiled flash attention on ORT's intra-op thread pool.
#pragma once

#include "attention_op_base.h"
#include "tile_kernels.h"

namespace onnxpress {

// Runs one bound call: packs K/V per (batch, kv head), then runs (batch, head, query block)
// tasks through KernelContext_ParallelFor.
void RunAttentionCpu(const AttentionCall& call, const TileKernels& tiles, OrtKernelContext* context);

struct AttentionCpuKernel {
  // The instruction set is chosen when the session creates the kernel (ONNXPRESS_OPS_SIMD).
  explicit AttentionCpuKernel(const AttentionAttrs& attrs) : attrs_(attrs), tiles_(&SelectTileKernels()) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    return GuardedCall([&] { RunAttentionCpu(BindAttentionCall(context, attrs_), *tiles_, context); });
  }

  AttentionAttrs attrs_;
  const TileKernels* tiles_;
};

struct AttentionCpuOp : AttentionOpBase<AttentionCpuOp, AttentionCpuKernel> {
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
};

}  // namespace onnxpress
