// CUDA flash attention for onnxpress.Attention (float32).
//
// Deliberately simple: one thread block per (query tile, head, batch); K/V tiles staged in
// shared memory; online softmax with a running max / sum per query row; the output tile is
// accumulated in shared memory and written once. Correctness first; no tensor cores.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "attention_cuda_kernel.h"

namespace onnxpress {
namespace {

constexpr int kQueryTile = 16;
constexpr int kKeyTile = 32;
constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ bool KeepKey(const void* mask, int mask_type, int64_t index) {
  switch (mask_type) {
    case 1: return static_cast<const unsigned char*>(mask)[index] != 0;
    case 2: return static_cast<const int*>(mask)[index] != 0;
    case 3: return static_cast<const long long*>(mask)[index] != 0;
    case 4: return static_cast<const float*>(mask)[index] != 0.0f;
    default: return true;
  }
}

// Row `j` of the concatenated [past; new] keys (or values) of one (batch, kv head).
__device__ __forceinline__ const float* KvRow(const float* past, const float* fresh, const AttentionGpuArgs& a,
                                              int64_t b, int64_t hk, int64_t j) {
  const int64_t D = a.head_size;
  if (j < a.past_len) return past + ((b * a.kv_num_heads + hk) * a.past_len + j) * D;
  return fresh + ((b * a.kv_len + (j - a.past_len)) * a.kv_num_heads + hk) * D;
}

__global__ void AttentionKernel(const AttentionGpuArgs a) {
  extern __shared__ float smem[];
  const int64_t D = a.head_size;
  const int k_stride = static_cast<int>(D) + 1;  // +1 breaks shared-memory bank conflicts
  float* q_tile = smem;                          // [kQueryTile][D]
  float* o_tile = q_tile + kQueryTile * D;       // [kQueryTile][D]
  float* k_tile = o_tile + kQueryTile * D;       // [kKeyTile][D + 1]
  float* v_tile = k_tile + kKeyTile * k_stride;  // [kKeyTile][D]
  float* s_tile = v_tile + kKeyTile * D;         // [kQueryTile][kKeyTile]
  float* row_max = s_tile + kQueryTile * kKeyTile;
  float* row_sum = row_max + kQueryTile;
  float* row_alpha = row_sum + kQueryTile;

  const int64_t b = blockIdx.z, h = blockIdx.y, i0 = static_cast<int64_t>(blockIdx.x) * kQueryTile;
  const int64_t hk = h / (a.num_heads / a.kv_num_heads);
  const int rows = static_cast<int>(min(static_cast<int64_t>(kQueryTile), a.q_len - i0));
  const int tid = threadIdx.x;
  const int64_t p0 = a.q_offset + i0, p1 = p0 + rows - 1;
  const int64_t hidden = a.num_heads * D;

  const float q_scale = a.scale * kLog2e;
  for (int idx = tid; idx < rows * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    q_tile[idx] = a.query[(b * a.q_len + i0 + r) * hidden + h * D + d] * q_scale;
    o_tile[idx] = 0.0f;
  }
  if (tid < kQueryTile) {
    row_max[tid] = -INFINITY;
    row_sum[tid] = 0.0f;
  }

  int64_t lo = 0, hi = a.total_len;
  if (a.causal) hi = min(hi, p1 + 1);
  if (a.window > 0) {
    lo = max(lo, p0 - a.window + 1);
    if (!a.causal) hi = min(hi, p1 + a.window);
  }
  __syncthreads();

  for (int64_t j0 = lo; j0 < hi; j0 += kKeyTile) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kKeyTile), hi - j0));
    for (int idx = tid; idx < n * D; idx += blockDim.x) {
      const int c = idx / D, d = idx % D;
      k_tile[c * k_stride + d] = KvRow(a.past_key, a.key, a, b, hk, j0 + c)[d];
      v_tile[c * D + d] = KvRow(a.past_value, a.value, a, b, hk, j0 + c)[d];
    }
    __syncthreads();

    for (int idx = tid; idx < kQueryTile * kKeyTile; idx += blockDim.x) {
      const int r = idx / kKeyTile, c = idx % kKeyTile;
      const int64_t pos = p0 + r, key = j0 + c;
      bool allowed = r < rows && c < n;
      if (allowed && a.mask_type != 0) allowed = KeepKey(a.mask, a.mask_type, b * a.total_len + key);
      if (a.causal) allowed = allowed && key <= pos;
      if (a.window > 0) {
        allowed = allowed && key > pos - a.window;
        if (!a.causal) allowed = allowed && key < pos + a.window;
      }
      float score = -INFINITY;
      if (allowed) {
        score = 0.0f;
        for (int d = 0; d < D; ++d) score += q_tile[r * D + d] * k_tile[c * k_stride + d];
      }
      s_tile[idx] = score;
    }
    __syncthreads();

    if (tid < rows) {  // online softmax, one thread per query row
      float* s_row = s_tile + tid * kKeyTile;
      float tile_max = -INFINITY;
      for (int c = 0; c < n; ++c) tile_max = fmaxf(tile_max, s_row[c]);
      const float new_max = fmaxf(row_max[tid], tile_max);
      if (new_max == -INFINITY) {
        for (int c = 0; c < n; ++c) s_row[c] = 0.0f;
        row_alpha[tid] = 1.0f;
      } else {
        const float alpha = exp2f(row_max[tid] - new_max);
        float sum = 0.0f;
        for (int c = 0; c < n; ++c) {
          s_row[c] = exp2f(s_row[c] - new_max);
          sum += s_row[c];
        }
        row_max[tid] = new_max;
        row_sum[tid] = row_sum[tid] * alpha + sum;
        row_alpha[tid] = alpha;
      }
    }
    __syncthreads();

    for (int idx = tid; idx < rows * D; idx += blockDim.x) {
      const int r = idx / D, d = idx % D;
      float acc = o_tile[idx] * row_alpha[r];
      for (int c = 0; c < n; ++c) acc += s_tile[r * kKeyTile + c] * v_tile[c * D + d];
      o_tile[idx] = acc;
    }
    __syncthreads();
  }

  for (int idx = tid; idx < rows * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    const float sum = row_sum[r];  // 0 when every key of the row is masked: write zeros, not NaN
    a.output[(b * a.q_len + i0 + r) * hidden + h * D + d] = sum > 0.0f ? o_tile[idx] / sum : 0.0f;
  }
}

// present_key / present_value = concat(past, new) in [B, H_kv, S_total, D] layout.
__global__ void PresentKernel(const AttentionGpuArgs a, const float* past, const float* fresh, float* present) {
  const int64_t D = a.head_size;
  const int64_t count = a.batch * a.kv_num_heads * a.total_len * D;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < count;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = idx % D, j = (idx / D) % a.total_len, bh = idx / (D * a.total_len);
    present[idx] = KvRow(past, fresh, a, bh / a.kv_num_heads, bh % a.kv_num_heads, j)[d];
  }
}

size_t SharedBytes(int64_t head_size) {
  const size_t floats = 2 * kQueryTile * head_size + kKeyTile * (head_size + 1) + kKeyTile * head_size +
                        kQueryTile * kKeyTile + 3 * kQueryTile;
  return floats * sizeof(float);
}

}  // namespace

const char* LaunchAttentionCuda(const AttentionGpuArgs& args, void* stream_handle) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  const int64_t present_count = args.batch * args.kv_num_heads * args.total_len * args.head_size;
  if (present_count > 0) {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((present_count + 255) / 256, 65535));
    if (args.present_key) PresentKernel<<<blocks, 256, 0, stream>>>(args, args.past_key, args.key, args.present_key);
    if (args.present_value) {
      PresentKernel<<<blocks, 256, 0, stream>>>(args, args.past_value, args.value, args.present_value);
    }
  }
  if (args.batch > 0 && args.q_len > 0) {
    const size_t shared = SharedBytes(args.head_size);
    if (shared > 48 * 1024) {  // above the default limit the kernel must opt in
      cudaError_t error = cudaFuncSetAttribute(AttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(shared));
      if (error != cudaSuccess) return cudaGetErrorString(error);
    }
    const dim3 grid(static_cast<unsigned>((args.q_len + kQueryTile - 1) / kQueryTile),
                    static_cast<unsigned>(args.num_heads), static_cast<unsigned>(args.batch));
    AttentionKernel<<<grid, kThreads, shared, stream>>>(args);
  }
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace onnxpress
