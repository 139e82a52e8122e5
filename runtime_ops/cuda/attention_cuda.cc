// Host side of the CUDA op: validate on the host (shapes are host metadata), launch on ORT's stream.
#include "attention_cuda.h"

#include "attention_cuda_kernel.h"

namespace onnxpress {

OrtStatusPtr AttentionCudaKernel::ComputeV2(OrtKernelContext* context) const {
  return GuardedCall([&] {
    const AttentionCall call = BindAttentionCall(context, attrs_);
    void* stream = nullptr;
    Ort::ThrowOnError(Ort::GetApi().KernelContext_GetGPUComputeStream(context, &stream));
    const AttentionGpuArgs args{call.batch,    call.q_len,        call.kv_len,    call.past_len,
                                call.total_len, call.num_heads,    call.kv_num_heads, call.head_size,
                                call.q_offset, call.window,       call.scale,     call.causal,
                                static_cast<int>(call.mask_type),  call.query,    call.key,
                                call.value,    call.past_key,     call.past_value, call.mask,
                                call.output,   call.present_key,  call.present_value};
    if (const char* error = LaunchAttentionCuda(args, stream)) {
      throw Ort::Exception(std::string("onnxpress.Attention (CUDA): ") + error, ORT_FAIL);
    }
  });
}

}  // namespace onnxpress
