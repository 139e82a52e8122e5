// Flash-attention driver for the CPU: packing, masking, online softmax, parallel schedule.
//
// For each (batch, head, block of queries) the kernel walks the keys in tiles of
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

// Tile sizes. A task owns a block of up to kMaxQueryBlock query rows and copies the keys they see
// once (K panels, V rows); it walks them in tiles of kKeyBlock keys (2 x 16 KB at head size 32,
// L1/L2) and, per tile, runs groups of kRowGroup rows (two 3-row AVX2 register blocks; a
// 6 x 128 score block is 3 KB and stays in L1 from QK^T through PV). A group computes only the
// 16-key panels its causal / window range reaches, so large blocks (fewer K/V copies) cost no
// extra work. At S = 512, D = 32 one 512-row block per head (K/V packed once; Q, O, K, V take
// 256 KB, in L2) measured ~4% faster than three 192-row blocks that pack K/V three times.
constexpr int kRowGroup = 6;
constexpr int64_t kMaxQueryBlock = 512;
constexpr int64_t kMinTasks = 32;  // keeps a multi-core pool busy when batch x heads is small
constexpr int kKeyBlock = 128;  // multiple of kPanelWidth
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
static_assert(kKeyBlock % kPanelWidth == 0, "key tiles must be whole panels");
static_assert(kRowGroup <= kMaxQkExpRows, "qk_exp takes a whole row group");

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The rows of one head in Q, K, V (and in the output) sit H * D floats apart, a cache-line pair
// each: the copies below ask for rows this far ahead, as the hardware prefetcher does not.
constexpr int64_t kPrefetchRows = 8;
void PrefetchRow(const float* row, int64_t count) {
  for (int64_t i = 0; i < count; i += 16) __builtin_prefetch(row + i);
}
void PrefetchRowForWrite(float* row, int64_t count) {
  for (int64_t i = 0; i < count; i += 16) __builtin_prefetch(row + i, 1);
}

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

// Row j of the concatenated [past; new] keys (or values) of one (batch, kv head).
const float* KvRow(const AttentionCall& call, const float* past, const float* fresh, int64_t b, int64_t hk,
                   int64_t j) {
  const int64_t D = call.head_size;
  if (j < call.past_len) return past + ((b * call.kv_num_heads + hk) * call.past_len + j) * D;
  return fresh + ((b * call.kv_len + j - call.past_len) * call.kv_num_heads + hk) * D;
}

// Keys [begin, end) as panels [panel][d][16] (begin is a multiple of 16), so the QK^T micro-kernel
// reads one contiguous 64-byte row per head-dimension step. Each task packs the keys it needs:
// that avoids a separate packing pass and its thread-pool barrier (which costs more than the
// vectorised re-packing on a busy machine), and a window packs only its own keys.
void PackKeys(const AttentionCall& call, const TileKernels& tiles, int64_t b, int64_t hk, int64_t begin,
              int64_t end, float* panels) {
  const int D = static_cast<int>(call.head_size);
  const int64_t Hkv = call.kv_num_heads;
  const int64_t past_end = std::min(end, call.past_len);
  if (begin < past_end) {  // past segment: rows of [B, H_kv, S_past, D]
    tiles.pack_keys(call.past_key + ((b * Hkv + hk) * call.past_len + begin) * D, D,
                    static_cast<int>(past_end - begin), D, panels, 0);
  }
  const int64_t new_begin = std::max(begin, call.past_len);
  if (new_begin < end) {  // new keys: rows of [B, S_kv, H_kv * D]
    tiles.pack_keys(call.key + ((b * call.kv_len + new_begin - call.past_len) * Hkv + hk) * D, Hkv * D,
                    static_cast<int>(end - new_begin), D, panels, new_begin - begin);
  }
  for (int64_t j = end; j < begin + RoundUp(end - begin, kPanelWidth); ++j) {  // finite filler
    float* column = panels + ((j - begin) / kPanelWidth) * D * kPanelWidth + (j - begin) % kPanelWidth;
    for (int d = 0; d < D; ++d) column[d * kPanelWidth] = 0.0f;
  }
}

// Values [begin, end) as rows of `stride` floats, zero padded past the head size.
void GatherValues(const AttentionCall& call, int64_t b, int64_t hk, int64_t begin, int64_t end, int64_t stride,
                  float* rows) {
  const int64_t D = call.head_size;
  for (int64_t j = begin; j < end; ++j) {
    if (j + kPrefetchRows < end) PrefetchRow(KvRow(call, call.past_value, call.value, b, hk, j + kPrefetchRows), D);
    float* out = rows + (j - begin) * stride;
    std::memcpy(out, KvRow(call, call.past_value, call.value, b, hk, j), D * sizeof(float));
    std::fill(out + D, out + stride, 0.0f);
  }
}

// present_key / present_value of one (batch, kv head): [S_total, D] rows of [past; new].
void WritePresent(const AttentionCall& call, int64_t b, int64_t hk) {
  const int64_t D = call.head_size, bh = b * call.kv_num_heads + hk;
  for (int64_t j = 0; j < call.total_len; ++j) {
    const size_t bytes = D * sizeof(float);
    if (call.present_key) {
      std::memcpy(call.present_key + (bh * call.total_len + j) * D, KvRow(call, call.past_key, call.key, b, hk, j),
                  bytes);
    }
    if (call.present_value) {
      std::memcpy(call.present_value + (bh * call.total_len + j) * D,
                  KvRow(call, call.past_value, call.value, b, hk, j), bytes);
    }
  }
}

// Keys [lo, hi) that some query at absolute positions p_first..p_last may attend to under the
// causal flag and the window (padding aside).
struct KeyRange {
  int64_t lo, hi;
};
KeyRange VisibleKeys(const AttentionCall& call, int64_t p_first, int64_t p_last) {
  KeyRange range{0, call.total_len};
  if (call.causal) range.hi = std::min(range.hi, p_last + 1);
  if (call.window > 0) {
    range.lo = std::max<int64_t>(range.lo, p_first - call.window + 1);
    if (!call.causal) range.hi = std::min(range.hi, p_last + call.window);
  }
  return range;
}

struct TaskScratch {
  Scratch q, o, s, stats, k, v;
};

// One online-softmax step of `rows` query rows (positions pos0, pos0 + 1, ...) over keys
// [js, js + n): QK^T into s (row stride kKeyBlock), then, when `masked`, -inf for every key a row
// may not see (key padding via keep, causal, window), then softmax. Leaves P in s and the
// output rescale factors in alpha.
void UnfusedStep(const AttentionCall& call, const TileKernels& tiles, const uint8_t* keep, bool masked,
                 const float* q, int64_t ldq, int rows, int64_t pos0, const float* k_panels, int64_t js, int n,
                 float* s, float* row_max, float* row_sum, float* alpha) {
  tiles.qk(q, ldq, rows, k_panels, (n + kPanelWidth - 1) / kPanelWidth, static_cast<int>(call.head_size), s,
           kKeyBlock);
  if (masked) {
    for (int r = 0; r < rows; ++r) {
      const int64_t pos = pos0 + r;
      float* s_row = s + r * kKeyBlock;
      for (int c = 0; c < n; ++c) {
        const int64_t key = js + c;
        bool allowed = !keep || keep[key];
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
}

// Attention for query rows [i0, i0 + rows) of one (batch, head).
void RunQueryBlock(const AttentionCall& call, const TileKernels& tiles, const KeyMask& mask, int64_t b, int64_t h,
                   int64_t i0, int rows) {
  thread_local TaskScratch scratch;
  const int64_t D = call.head_size, Dp = RoundUp(D, 8), total = call.total_len;
  const int64_t H = call.num_heads, hk = h / (H / call.kv_num_heads);
  const int64_t p0 = call.q_offset + i0, p1 = p0 + rows - 1;  // absolute positions of the rows

  const auto [lo, hi] = VisibleKeys(call, p0, p1);  // keys any row of the block may attend to

  float* out = call.output + ((b * call.q_len + i0) * H + h) * D;
  const int64_t out_stride = H * D;
  if (hi <= lo) {  // every row fully masked
    for (int r = 0; r < rows; ++r) std::fill(out + r * out_stride, out + r * out_stride + D, 0.0f);
    return;
  }

  float* q = scratch.q.Get(rows * Dp);
  float* o = scratch.o.Get(rows * Dp);
  float* s = scratch.s.Get(kRowGroup * kKeyBlock);
  float* row_max = scratch.stats.Get(3 * rows);
  float* row_sum = row_max + rows;
  float* alpha = row_sum + rows;

  // Fold scale and log2(e) into Q once so the softmax can use exp2 on raw dot products.
  const float q_scale = call.scale * kLog2e;
  const float* q_in = call.query + ((b * call.q_len + i0) * H + h) * D;
  for (int r = 0; r < rows; ++r) {
    if (r + kPrefetchRows < rows) PrefetchRow(q_in + (r + kPrefetchRows) * out_stride, D);
    for (int64_t d = 0; d < D; ++d) q[r * Dp + d] = q_in[r * out_stride + d] * q_scale;
    std::fill(q + r * Dp + D, q + (r + 1) * Dp, 0.0f);
  }
  std::fill(o, o + rows * Dp, 0.0f);
  std::fill(row_max, row_max + rows, kNegInf);
  std::fill(row_sum, row_sum + rows, 0.0f);

  // K/V of the keys this block can see, copied once per task: K as panels, V as contiguous
  // rows (zero padded to Dp). Reading V in place would stride by H_kv * D floats per key, and at
  // head size 32 (1.5 KB apart) a 64-key tile maps onto a few L1 sets and evicts itself.
  const int64_t first = lo / kPanelWidth * kPanelWidth;
  float* k_panels = scratch.k.Get(RoundUp(hi - first, kPanelWidth) * D);
  PackKeys(call, tiles, b, hk, first, hi, k_panels);
  float* values = scratch.v.Get((hi - first) * Dp);  // row 0 = key `first`
  GatherValues(call, b, hk, first, hi, Dp, values);
  const uint8_t* keep = mask.present() ? &mask.keep[b * total] : nullptr;
  for (int64_t j = first; j < hi; j += kKeyBlock) {
    const int64_t tile_end = std::min(j + kKeyBlock, hi);
    // QK^T, softmax and PV run per group of kRowGroup rows, so the score rows stay in L1
    // between the three steps while this tile's K panels and V rows are reused by every group.
    for (int g = 0; g < rows; g += kRowGroup) {
      const int group_rows = std::min(kRowGroup, rows - g);
      const int64_t g0 = p0 + g, g1 = g0 + group_rows - 1;  // positions of the group's rows
      // Only the 16-key panels of this tile that some row of the group can see (causal / window).
      const KeyRange seen = VisibleKeys(call, g0, g1);
      const int64_t js = std::max(j, seen.lo / kPanelWidth * kPanelWidth), je = std::min(tile_end, seen.hi);
      if (js >= je) continue;
      const int n = static_cast<int>(je - js);
      // Per-element masking only where the keys straddle a mask boundary of some row.
      bool partial = (keep && mask.AnyPadded(b, total, js, je)) || (call.causal && je - 1 > g0);
      if (call.window > 0) {
        partial = partial || js <= g1 - call.window;
        if (!call.causal) partial = partial || je - 1 >= g0 + call.window;
      }
      const float* q_g = q + g * Dp;
      const float* k_js = k_panels + (js - first) * D;
      float *m = row_max + g, *l = row_sum + g, *a = alpha + g;
      // Unmasked keys take the fused qk_exp against the running max (alpha = 1: the output
      // accumulator keeps its scale). If a score outgrows that max too far, qk_exp changes
      // nothing and the keys are redone unfused with an exact max.
      if (!partial && tiles.qk_exp(q_g, Dp, group_rows, k_js, n, static_cast<int>(D), m, s, kKeyBlock, l)) {
        std::fill(a, a + group_rows, 1.0f);
      } else {
        UnfusedStep(call, tiles, keep, partial, q_g, Dp, group_rows, g0, k_js, js, n, s, m, l, a);
      }
      tiles.pv(s, kKeyBlock, group_rows, n, values + (js - first) * Dp, Dp, o + g * Dp, Dp, static_cast<int>(Dp), a);
    }
  }

  for (int r = 0; r < rows; ++r) {
    float* out_row = out + r * out_stride;
    if (r + kPrefetchRows < rows) PrefetchRowForWrite(out_row + kPrefetchRows * out_stride, D);
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
  const KeyMask mask(call);
  // Query blocks as large as kMaxQueryBlock (each block packs its K/V once), but at least
  // kMinTasks tasks where the queries allow, and equal sizes (multiples of kRowGroup).
  const int64_t bh_count = call.batch * call.num_heads;
  const int64_t q_blocks = std::min(std::max((call.q_len + kMaxQueryBlock - 1) / kMaxQueryBlock,
                                             (kMinTasks + bh_count - 1) / bh_count),
                                    std::max<int64_t>(1, call.q_len / kRowGroup));
  const int64_t block_rows = RoundUp((call.q_len + q_blocks - 1) / q_blocks, kRowGroup);
  const int64_t group = call.num_heads / call.kv_num_heads;
  const bool write_present = call.present_key || call.present_value;
  // One parallel pass over (batch, head, query block); the first task of each (batch, kv head)
  // also writes its present_key / present_value.
  auto attend = [&](size_t index) {
    const int64_t block = static_cast<int64_t>(index) % q_blocks;
    const int64_t bh = static_cast<int64_t>(index) / q_blocks;
    const int64_t b = bh / call.num_heads, h = bh % call.num_heads;
    if (write_present && block == 0 && h % group == 0) WritePresent(call, b, h / group);
    const int64_t i0 = block * block_rows;
    if (i0 >= call.q_len) return;  // rounding up to kRowGroup can leave the last block empty
    const int rows = static_cast<int>(std::min<int64_t>(block_rows, call.q_len - i0));
    RunQueryBlock(call, tiles, mask, b, h, i0, rows);
  };
  if (call.q_len > 0) {
    ParallelFor(context, static_cast<size_t>(call.batch * call.num_heads * q_blocks), attend);
  } else if (write_present) {  // no queries, but the cache still grows
    for (int64_t b = 0; b < call.batch; ++b) {
      for (int64_t hk = 0; hk < call.kv_num_heads; ++hk) WritePresent(call, b, hk);
    }
  }
}

}  // namespace onnxpress
