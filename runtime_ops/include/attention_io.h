// onnxpress.Attention: attributes, validated shapes and tensor bindings.
//
// Shared by the CPU and CUDA kernels: both read attributes and check shapes on the host the
// same way; only where the data lives differs.
#pragma once

#include <cstdint>

#include "onnxpress_ort.h"

namespace onnxpress {

// Input / output slots of the op (see runtime_ops/README.md for the schema).
enum AttentionInput : size_t {
  kQuery = 0,
  kKey = 1,
  kValue = 2,
  kAttentionMask = 3,
  kPastKey = 4,
  kPastValue = 5,
  kNumAttentionInputs = 6,
};
enum AttentionOutput : size_t {
  kOutput = 0,
  kPresentKey = 1,
  kPresentValue = 2,
  kNumAttentionOutputs = 3,
};

struct AttentionAttrs {
  int64_t num_heads = 0;
  int64_t kv_num_heads = 0;
  float scale = 0.0f;  // 0 means 1/sqrt(head_size), resolved per call
  bool causal = false;
  int64_t window = 0;  // 0 = unlimited
};

// Reads and checks the node attributes; throws Ort::Exception with a readable message.
AttentionAttrs ReadAttentionAttrs(const OrtKernelInfo* info);

// Which kind of key-padding mask was given.
enum class MaskType { kNone, kBool, kInt32, kInt64, kFloat };

// Everything a kernel needs for one call, after shape validation and output allocation.
// Pointers are host or device pointers depending on the execution provider.
struct AttentionCall {
  int64_t batch = 0;
  int64_t q_len = 0;      // S_q
  int64_t kv_len = 0;     // S_kv (new keys in this call)
  int64_t past_len = 0;   // S_past
  int64_t total_len = 0;  // S_past + S_kv
  int64_t num_heads = 0;
  int64_t kv_num_heads = 0;
  int64_t head_size = 0;
  float scale = 0.0f;
  bool causal = false;
  int64_t window = 0;
  // Absolute position of query row 0: queries are aligned to the end of the keys.
  int64_t q_offset = 0;

  const float* query = nullptr;       // [B, S_q, H*D]
  const float* key = nullptr;         // [B, S_kv, H_kv*D]
  const float* value = nullptr;       // [B, S_kv, H_kv*D]
  const void* mask = nullptr;         // [B, S_total] or null
  MaskType mask_type = MaskType::kNone;
  const float* past_key = nullptr;    // [B, H_kv, S_past, D] or null
  const float* past_value = nullptr;  // [B, H_kv, S_past, D] or null
  float* output = nullptr;            // [B, S_q, H*D]
  float* present_key = nullptr;       // [B, H_kv, S_total, D] or null (not requested)
  float* present_value = nullptr;     // [B, H_kv, S_total, D] or null (not requested)
};

// Validates the inputs against the attributes, allocates the requested outputs and returns
// the bound call. Throws Ort::Exception(ORT_INVALID_ARGUMENT) naming the offending input.
AttentionCall BindAttentionCall(OrtKernelContext* context, const AttentionAttrs& attrs);

// Shape inference: output has the query's type and shape.
OrtStatusPtr InferAttentionOutputShape(const OrtApi& api, OrtShapeInferContext* ctx);

}  // namespace onnxpress
