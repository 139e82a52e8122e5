// Flash-attention driver for the CPU: packing, masking, online softmax, parallel schedule.
//
// For each (batch, head, block of kQueryBlock queries) the kernel walks the keys in tiles of
// kKeyBlock, keeping a running max / sum per query row, so no S x S score matrix is ever
// materialised: the working set per task is a few tens of KB and stays in L1/L2.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "attention_cpu.h"

namespace onnxpress {
namespace {

#ifndef ONNXPRESS_QBLOCK
#define ONNXPRESS_QBLOCK 64
#define ONNXPRESS_KBLOCK 128
#endif
constexpr int kQueryBlock = ONNXPRESS_QBLOCK;
constexpr int kKeyBlock = ONNXPRESS_KBLOCK;  // multiple of kPanelWidth
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
static_assert(kKeyBlock % kPanelWidth == 0, "key tiles must be whole panels");

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Grow-only, 64-byte aligned float buffer. Kept per thread (thread_local) so steady-state calls
// do not allocate; a kernel may run concurrently from several Run() calls, so no shared state.
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(data_); }

  float* Get(size_t count) {
    if (count > capacity_) {
      std::free(data_);
      const size_t bytes = RoundUp(static_cast<int64_t>(std::max<size_t>(count, 16) * sizeof(float)), 64);
      data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (!data_) throw std::bad_alloc();
      capacity_ = bytes / sizeof(float);
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  size_t capacity_ = 0;
};

template <typename F>
void ParallelFor(OrtKernelContext* context, size_t total, F& body) {
  if (total == 0) return;
  if (total == 1) {
    body(0);
    return;
  }
  auto trampoline = [](void* user, size_t index) { (*static_cast<F*>(user))(index); };
  Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(context, trampoline, total, 0, &body));
}

// Key-padding mask as bytes (1 = keep) plus a prefix count of padded keys, so a tile can ask
// "any padding in [j, j + n)?" in O(1) and skip per-element masking when there is none.
struct KeyMask {
  std::vector<uint8_t> keep;      // [B, S_total]
  std::vector<int32_t> n_padded;  // [B, S_total + 1], prefix sums of !keep

  explicit KeyMask(const AttentionCall& call) {
    if (call.mask_type == MaskType::kNone) return;
    const int64_t total = call.total_len;
    keep.resize(call.batch * total);
    n_padded.resize(call.batch * (total + 1));
    for (int64_t i = 0; i < call.batch * total; ++i) {
      switch (call.mask_type) {
        case MaskType::kBool: keep[i] = static_cast<const uint8_t*>(call.mask)[i] != 0; break;
        case MaskType::kInt32: keep[i] = static_cast<const int32_t*>(call.mask)[i] != 0; break;
        case MaskType::kInt64: keep[i] = static_cast<const int64_t*>(call.mask)[i] != 0; break;
        case MaskType::kFloat: keep[i] = static_cast<const float*>(call.mask)[i] != 0.0f; break;
        case MaskType::kNone: break;
      }
    }
    for (int64_t b = 0; b < call.batch; ++b) {
      int32_t* prefix = &n_padded[b * (total + 1)];
      prefix[0] = 0;
      for (int64_t j = 0; j < total; ++j) prefix[j + 1] = prefix[j] + !keep[b * total + j];
    }
  }

  bool present() const { return !keep.empty(); }
  bool AnyPadded(int64_t b, int64_t total, int64_t begin, int64_t end) const {
    const int32_t* prefix = &n_padded[b * (total + 1)];
    return prefix[end] != prefix[begin];
  }
};

// K of one (batch, kv head) as key panels [panel][d][16], V as rows [S_total][head_size_padded].
struct PackedKV {
  int64_t panels = 0;
  int64_t v_stride = 0;  // head size rounded up to 8 (zero padded) so PV needs no column tail
  float* k = nullptr;
  float* v = nullptr;

  const float* KeyPanels(int64_t b, int64_t kv_head, int64_t kv_heads, int64_t head_size) const {
    return k + (b * kv_heads + kv_head) * panels * head_size * kPanelWidth;
  }
  const float* Values(int64_t b, int64_t kv_head, int64_t kv_heads, int64_t total) const {
    return v + (b * kv_heads + kv_head) * total * v_stride;
  }
};

// Gathers past + new keys/values of one (batch, kv head) into the packed layout and writes
// present_key / present_value (which have the plain [S_total, D] layout) on the way.
void PackOneHead(const AttentionCall& call, const PackedKV& packed, int64_t b, int64_t hk) {
  const int64_t D = call.head_size, Hkv = call.kv_num_heads, total = call.total_len;
  const int64_t bh = b * Hkv + hk;
  float* k_panels = packed.k + bh * packed.panels * D * kPanelWidth;
  float* v_rows = packed.v + bh * total * packed.v_stride;
  for (int64_t j = 0; j < total; ++j) {
    const bool from_past = j < call.past_len;
    const float* k_row = from_past ? call.past_key + (bh * call.past_len + j) * D
                                   : call.key + ((b * call.kv_len + j - call.past_len) * Hkv + hk) * D;
    const float* v_row = from_past ? call.past_value + (bh * call.past_len + j) * D
                                   : call.value + ((b * call.kv_len + j - call.past_len) * Hkv + hk) * D;
    float* panel = k_panels + (j / kPanelWidth) * D * kPanelWidth + j % kPanelWidth;
    for (int64_t d = 0; d < D; ++d) panel[d * kPanelWidth] = k_row[d];
    float* v_out = v_rows + j * packed.v_stride;
    std::memcpy(v_out, v_row, D * sizeof(float));
    std::fill(v_out + D, v_out + packed.v_stride, 0.0f);
    if (call.present_key) std::memcpy(call.present_key + (bh * total + j) * D, k_row, D * sizeof(float));
    if (call.present_value) std::memcpy(call.present_value + (bh * total + j) * D, v_row, D * sizeof(float));
  }
  // Zero the unused key slots of the last panel so the QK tile reads finite numbers.
  for (int64_t j = total; j < packed.panels * kPanelWidth; ++j) {
    float* panel = k_panels + (j / kPanelWidth) * D * kPanelWidth + j % kPanelWidth;
    for (int64_t d = 0; d < D; ++d) panel[d * kPanelWidth] = 0.0f;
  }
}

struct TaskScratch {
  Scratch q, o, s, stats;
};

// Attention for query rows [i0, i0 + rows) of one (batch, head).
void RunQueryBlock(const AttentionCall& call, const TileKernels& tiles, const PackedKV& packed,
                   const KeyMask& mask, int64_t b, int64_t h, int64_t i0, int rows) {
  thread_local TaskScratch scratch;
  const int64_t D = call.head_size, Dp = packed.v_stride, total = call.total_len;
  const int64_t H = call.num_heads, hk = h / (H / call.kv_num_heads);
  const int64_t p0 = call.q_offset + i0, p1 = p0 + rows - 1;  // absolute positions of the rows

  // Keys any row of the block may attend to.
  int64_t lo = 0, hi = total;
  if (call.causal) hi = std::min(hi, p1 + 1);
  if (call.window > 0) {
    lo = std::max<int64_t>(lo, p0 - call.window + 1);
    if (!call.causal) hi = std::min(hi, p1 + call.window);
  }

  float* out = call.output + ((b * call.q_len + i0) * H + h) * D;
  const int64_t out_stride = H * D;
  if (hi <= lo) {  // every row fully masked
    for (int r = 0; r < rows; ++r) std::fill(out + r * out_stride, out + r * out_stride + D, 0.0f);
    return;
  }

  float* q = scratch.q.Get(kQueryBlock * Dp);
  float* o = scratch.o.Get(kQueryBlock * Dp);
  float* s = scratch.s.Get(kQueryBlock * kKeyBlock);
  float* row_max = scratch.stats.Get(3 * kQueryBlock);
  float* row_sum = row_max + kQueryBlock;
  float* alpha = row_sum + kQueryBlock;

  // Fold scale and log2(e) into Q once so the softmax can use exp2 on raw dot products.
  const float q_scale = call.scale * kLog2e;
  const float* q_in = call.query + ((b * call.q_len + i0) * H + h) * D;
  for (int r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < D; ++d) q[r * Dp + d] = q_in[r * out_stride + d] * q_scale;
    std::fill(q + r * Dp + D, q + (r + 1) * Dp, 0.0f);
  }
  std::fill(o, o + rows * Dp, 0.0f);
  std::fill(row_max, row_max + rows, kNegInf);
  std::fill(row_sum, row_sum + rows, 0.0f);

  const float* k_panels = packed.KeyPanels(b, hk, call.kv_num_heads, D);
  const float* values = packed.Values(b, hk, call.kv_num_heads, total);
  const uint8_t* keep = mask.present() ? &mask.keep[b * total] : nullptr;
  for (int64_t j = lo / kPanelWidth * kPanelWidth; j < hi; j += kKeyBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kKeyBlock, hi - j));
    const int panels = (n + kPanelWidth - 1) / kPanelWidth;
    tiles.qk(q, Dp, rows, k_panels + j * D, panels, static_cast<int>(D), s, kKeyBlock);

    // Per-element masking only for tiles that straddle a mask boundary.
    bool partial = j < lo;
    if (keep) partial = partial || mask.AnyPadded(b, total, j, j + n);
    if (call.causal) partial = partial || j + n - 1 > p0;
    if (call.window > 0) {
      partial = partial || j <= p1 - call.window;
      if (!call.causal) partial = partial || j + n - 1 >= p0 + call.window;
    }
    if (partial) {
      for (int r = 0; r < rows; ++r) {
        const int64_t pos = p0 + r;
        float* s_row = s + r * kKeyBlock;
        for (int c = 0; c < n; ++c) {
          const int64_t key = j + c;
          bool allowed = key >= lo && (!keep || keep[key]);
          if (call.causal) allowed = allowed && key <= pos;
          if (call.window > 0) {
            allowed = allowed && key > pos - call.window;
            if (!call.causal) allowed = allowed && key < pos + call.window;
          }
          if (!allowed) s_row[c] = kNegInf;
        }
      }
    }
    tiles.softmax(s, kKeyBlock, rows, n, row_max, row_sum, alpha);
    tiles.pv(s, kKeyBlock, rows, n, values + j * Dp, Dp, o, Dp, static_cast<int>(Dp), alpha);
  }

  for (int r = 0; r < rows; ++r) {
    float* out_row = out + r * out_stride;
    if (row_sum[r] > 0.0f) {  // 0 means every key of the row was masked: output zeros, not NaN
      const float inv = 1.0f / row_sum[r];
      for (int64_t d = 0; d < D; ++d) out_row[d] = o[r * Dp + d] * inv;
    } else {
      std::fill(out_row, out_row + D, 0.0f);
    }
  }
}

}  // namespace

void RunAttentionCpu(const AttentionCall& call, const TileKernels& tiles, OrtKernelContext* context) {
  const int64_t D = call.head_size;
  const int64_t kv_heads = call.batch * call.kv_num_heads;

  // Packed K/V live in the calling thread's scratch and are shared read-only by the tasks.
  thread_local Scratch k_scratch, v_scratch;
  PackedKV packed;
  packed.panels = (call.total_len + kPanelWidth - 1) / kPanelWidth;
  packed.v_stride = RoundUp(D, 8);
  packed.k = k_scratch.Get(kv_heads * packed.panels * D * kPanelWidth);
  packed.v = v_scratch.Get(kv_heads * call.total_len * packed.v_stride);

  auto pack = [&](size_t index) {
    PackOneHead(call, packed, static_cast<int64_t>(index) / call.kv_num_heads,
                static_cast<int64_t>(index) % call.kv_num_heads);
  };
  ParallelFor(context, static_cast<size_t>(kv_heads), pack);

  const KeyMask mask(call);
  const int64_t q_blocks = (call.q_len + kQueryBlock - 1) / kQueryBlock;
  auto attend = [&](size_t index) {
    const int64_t block = static_cast<int64_t>(index) % q_blocks;
    const int64_t bh = static_cast<int64_t>(index) / q_blocks;
    const int64_t i0 = block * kQueryBlock;
    const int rows = static_cast<int>(std::min<int64_t>(kQueryBlock, call.q_len - i0));
    RunQueryBlock(call, tiles, packed, mask, bh / call.num_heads, bh % call.num_heads, i0, rows);
  };
  ParallelFor(context, static_cast<size_t>(call.batch * call.num_heads * q_blocks), attend);
}

}  // namespace onnxpress
