// Attribute parsing, shape validation and output allocation for onnxpress.Attention.
#include "attention_io.h"

#include <atomic>
#include <cmath>
#include <string>
#include <sstream>
#include <vector>

namespace onnxpress {
namespace {

bool TryGetInt(const OrtKernelInfo* info, const char* name, int64_t* out) {
  const OrtApi& api = Ort::GetApi();
  if (OrtStatus* status = api.KernelInfoGetAttribute_int64(info, name, out)) {
    api.ReleaseStatus(status);
    return false;
  }
  return true;
}

bool TryGetFloat(const OrtKernelInfo* info, const char* name, float* out) {
  const OrtApi& api = Ort::GetApi();
  if (OrtStatus* status = api.KernelInfoGetAttribute_float(info, name, out)) {
    api.ReleaseStatus(status);
    return false;
  }
  return true;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

struct BoundInput {
  const OrtValue* value = nullptr;
  std::vector<int64_t> shape;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
};

// Missing optional inputs (absent or given as "") come back with value == nullptr.
BoundInput GetInput(OrtKernelContext* context, size_t index) {
  const OrtApi& api = Ort::GetApi();
  BoundInput bound;
  size_t count = 0;
  Ort::ThrowOnError(api.KernelContext_GetInputCount(context, &count));
  if (index >= count) return bound;
  Ort::ThrowOnError(api.KernelContext_GetInput(context, index, &bound.value));
  if (bound.value == nullptr) return bound;
  Ort::ConstValue value{bound.value};
  auto info = value.GetTensorTypeAndShapeInfo();
  bound.shape = info.GetShape();
  bound.type = info.GetElementType();
  return bound;
}

bool OutputRequested(OrtKernelContext* context, size_t index) {
  size_t count = 0;
  Ort::ThrowOnError(Ort::GetApi().KernelContext_GetOutputCount(context, &count));
  return index < count;
}

float* AllocateOutput(OrtKernelContext* context, size_t index, const std::vector<int64_t>& shape) {
  OrtValue* value = nullptr;
  Ort::ThrowOnError(
      Ort::GetApi().KernelContext_GetOutput(context, index, shape.data(), shape.size(), &value));
  if (value == nullptr) return nullptr;  // optional output left unnamed in the node
  return Ort::UnownedValue{value}.GetTensorMutableData<float>();
}

const float* FloatData(const BoundInput& input) {
  return input.value ? Ort::ConstValue{input.value}.GetTensorData<float>() : nullptr;
}

MaskType ToMaskType(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
      return MaskType::kBool;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
      return MaskType::kInt32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
      return MaskType::kInt64;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return MaskType::kFloat;
    default:
      throw InvalidArgument(
          "attention_mask must be bool, uint8, int32, int64 or float (1 = keep, 0 = pad), got ONNX "
          "element type " + std::to_string(static_cast<int>(type)) + ": cast the mask first");
  }
}

}  // namespace

AttentionAttrs ReadAttentionAttrs(const OrtKernelInfo* info) {
  AttentionAttrs attrs;
  if (!TryGetInt(info, "num_heads", &attrs.num_heads) || attrs.num_heads <= 0) {
    throw InvalidArgument("attribute num_heads (int > 0) is required: set it on the node");
  }
  if (!TryGetInt(info, "kv_num_heads", &attrs.kv_num_heads)) attrs.kv_num_heads = attrs.num_heads;
  if (attrs.kv_num_heads <= 0 || attrs.num_heads % attrs.kv_num_heads != 0) {
    throw InvalidArgument("kv_num_heads=" + std::to_string(attrs.kv_num_heads) +
                          " must be > 0 and divide num_heads=" + std::to_string(attrs.num_heads) +
                          ": fix the node attributes");
  }
  if (!TryGetFloat(info, "scale", &attrs.scale)) {
    int64_t as_int = 0;
    if (TryGetInt(info, "scale", &as_int)) {
      throw InvalidArgument("attribute scale must be a float, got an int: write it as a float");
    }
    attrs.scale = 0.0f;
  }
  if (!std::isfinite(attrs.scale)) throw InvalidArgument("attribute scale must be finite");
  int64_t causal = 0;
  TryGetInt(info, "causal", &causal);
  if (causal != 0 && causal != 1) throw InvalidArgument("attribute causal must be 0 or 1");
  attrs.causal = causal == 1;
  TryGetInt(info, "window", &attrs.window);
  if (attrs.window < 0) throw InvalidArgument("attribute window must be >= 0 (0 = no window)");
  return attrs;
}

AttentionCall BindAttentionCall(OrtKernelContext* context, const AttentionAttrs& attrs) {
  const BoundInput query = GetInput(context, kQuery);
  const BoundInput key = GetInput(context, kKey);
  const BoundInput value = GetInput(context, kValue);
  const BoundInput mask = GetInput(context, kAttentionMask);
  const BoundInput past_key = GetInput(context, kPastKey);
  const BoundInput past_value = GetInput(context, kPastValue);
  if (!query.value || !key.value || !value.value) {
    throw InvalidArgument("query, key and value inputs are required");
  }

  AttentionCall call;
  const int64_t H = attrs.num_heads;
  const int64_t Hkv = attrs.kv_num_heads;
  if (query.shape.size() != 3) {
    throw InvalidArgument("query must be 3-D [batch, q_seq, num_heads*head_size], got " +
                          ShapeString(query.shape));
  }
  if (query.shape[2] % H != 0 || query.shape[2] == 0) {
    throw InvalidArgument("query hidden size " + std::to_string(query.shape[2]) +
                          " is not a positive multiple of num_heads=" + std::to_string(H) +
                          ": fix num_heads");
  }
  call.batch = query.shape[0];
  call.q_len = query.shape[1];
  call.num_heads = H;
  call.kv_num_heads = Hkv;
  call.head_size = query.shape[2] / H;
  const int64_t D = call.head_size;

  if (key.shape.size() != 3 || key.shape[0] != call.batch || key.shape[2] != Hkv * D) {
    throw InvalidArgument("key has shape " + ShapeString(key.shape) + " but expected [" +
                          std::to_string(call.batch) + ", kv_seq, " + std::to_string(Hkv * D) +
                          "] (kv_num_heads=" + std::to_string(Hkv) + " x head_size=" + std::to_string(D) +
                          "): check num_heads / kv_num_heads");
  }
  if (value.shape != key.shape) {
    throw InvalidArgument("value shape " + ShapeString(value.shape) + " must equal key shape " +
                          ShapeString(key.shape));
  }
  call.kv_len = key.shape[1];

  if ((past_key.value == nullptr) != (past_value.value == nullptr)) {
    throw InvalidArgument("past_key and past_value must be given together");
  }
  if (past_key.value) {
    const auto& ps = past_key.shape;
    if (ps.size() != 4 || ps[0] != call.batch || ps[1] != Hkv || ps[3] != D) {
      throw InvalidArgument("past_key has shape " + ShapeString(ps) + " but expected [" +
                            std::to_string(call.batch) + ", " + std::to_string(Hkv) + ", past_seq, " +
                            std::to_string(D) + "] (batch, kv_num_heads, past_seq, head_size)");
    }
    if (past_value.shape != ps) {
      throw InvalidArgument("past_value shape " + ShapeString(past_value.shape) +
                            " must equal past_key shape " + ShapeString(ps));
    }
    if (past_key.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ||
        past_value.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      throw InvalidArgument("past_key / past_value must be float32");
    }
    call.past_len = ps[2];
  }
  call.total_len = call.past_len + call.kv_len;
  call.q_offset = call.total_len - call.q_len;

  if (mask.value) {
    if (mask.shape.size() != 2 || mask.shape[0] != call.batch || mask.shape[1] != call.total_len) {
      throw InvalidArgument("attention_mask has shape " + ShapeString(mask.shape) + " but expected [" +
                            std::to_string(call.batch) + ", " + std::to_string(call.total_len) +
                            "] (batch, past_seq + kv_seq)");
    }
    call.mask_type = ToMaskType(mask.type);
    call.mask = Ort::ConstValue{mask.value}.GetTensorRawData();
  }

  call.scale = attrs.scale != 0.0f ? attrs.scale : 1.0f / std::sqrt(static_cast<float>(D));
  call.causal = attrs.causal;
  call.window = attrs.window;
  call.query = FloatData(query);
  call.key = FloatData(key);
  call.value = FloatData(value);
  call.past_key = FloatData(past_key);
  call.past_value = FloatData(past_value);

  call.output = AllocateOutput(context, kOutput, query.shape);
  const std::vector<int64_t> present_shape{call.batch, Hkv, call.total_len, D};
  if (OutputRequested(context, kPresentKey)) call.present_key = AllocateOutput(context, kPresentKey, present_shape);
  if (OutputRequested(context, kPresentValue)) {
    call.present_value = AllocateOutput(context, kPresentValue, present_shape);
  }
  return call;
}

OrtStatusPtr InferAttentionOutputShape(const OrtApi& api, OrtShapeInferContext* ctx) {
  // The output has the query's type and shape. ORT hands an unknown, unnamed dim over as -1 with
  // no name, and SetOutputTypeShape writes such a dim back as the literal dim_value -1, which
  // downstream inference then treats as a real size. So each such dim gets a fresh symbolic name
  // (unique per process, like ORT's own "unk__N"): unknown and unrelated to any other dim.
  // The query's info belongs to the context: releasing it here would double free.
  OrtTensorTypeAndShapeInfo* query_info = nullptr;
  if (OrtStatusPtr status = api.ShapeInferContext_GetInputTypeShape(ctx, kQuery, &query_info)) return status;
  size_t rank = 0;
  if (OrtStatusPtr status = api.GetDimensionsCount(query_info, &rank)) return status;
  if (rank == 0) return nullptr;  // rank unknown: say nothing rather than claim a scalar
  std::vector<int64_t> dims(rank);
  std::vector<const char*> names(rank, nullptr);
  if (OrtStatusPtr status = api.GetDimensions(query_info, dims.data(), rank)) return status;
  if (OrtStatusPtr status = api.GetSymbolicDimensions(query_info, names.data(), rank)) return status;
  static std::atomic<uint64_t> counter{0};
  std::vector<std::string> fresh(rank);
  std::vector<const char*> out_names(rank);
  for (size_t i = 0; i < rank; ++i) {
    const bool unnamed = names[i] == nullptr || names[i][0] == '\0';
    if (dims[i] < 0 && unnamed) fresh[i] = "onnxpress_unk__" + std::to_string(counter++);
    out_names[i] = unnamed ? fresh[i].c_str() : names[i];
  }
  OrtTensorTypeAndShapeInfo* out_info = nullptr;
  if (OrtStatusPtr status = api.CreateTensorTypeAndShapeInfo(&out_info)) return status;
  OrtStatusPtr status = api.SetTensorElementType(out_info, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  if (!status) status = api.SetDimensions(out_info, dims.data(), rank);
  if (!status) status = api.SetSymbolicDimensions(out_info, out_names.data(), rank);
  if (!status) status = api.ShapeInferContext_SetOutputTypeShape(ctx, kOutput, out_info);
  api.ReleaseTensorTypeAndShapeInfo(out_info);
  return status;
}

}  // namespace onnxpress
