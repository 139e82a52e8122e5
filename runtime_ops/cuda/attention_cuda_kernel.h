// Launch interface of the CUDA attention kernels. Plain C++ (no ORT, no CUDA headers) so the
// host op can include it and nvcc never has to see the ORT headers.
#pragma once

#include <cstdint>

namespace onnxpress {

// Same meaning as AttentionCall; all pointers are device pointers.
struct AttentionGpuArgs {
  int64_t batch, q_len, kv_len, past_len, total_len, num_heads, kv_num_heads, head_size, q_offset, window;
  float scale;
  bool causal;
  int mask_type;  // MaskType as int: 0 none, 1 bool/uint8, 2 int32, 3 int64, 4 float
  const float *query, *key, *value, *past_key, *past_value;
  const void* mask;
  float *output, *present_key, *present_value;
};

// Enqueues the kernels on `stream` (a cudaStream_t). Returns nullptr on success, else the CUDA
// error text.
const char* LaunchAttentionCuda(const AttentionGpuArgs& args, void* stream);

}  // namespace onnxpress
