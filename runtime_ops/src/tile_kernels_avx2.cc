// AVX2 + FMA versions of the attention tile loops.
//
// This file alone is compiled with -mavx2 -mfma. It deliberately uses only intrinsics and
// functions local to this file: an inline template from a shared header instantiated here
// could be picked by the linker for the scalar path too and crash on CPUs without AVX2.
#include <immintrin.h>

#include <type_traits>

#include "tile_kernels.h"

namespace onnxpress {
namespace {

constexpr float kNegInf = -__builtin_inff();

// 2^x for -127 <= x < 128 (smaller x, -inf included, is clamped and gives exactly 0): scores
// minus their running (or reference) max. Adding 1.5 * 2^23 + 127 rounds x to an integer n and
// leaves n + 127 in the low mantissa bits, so shifting those bits into the exponent field gives
// 2^n without a round / convert pair. 2^(x - n), |x - n| <= 0.5, is a degree-4 minimax
// polynomial: relative error < 3e-6 (as the degree-5 Taylor series it replaces), far inside the
// op's 1e-4 tolerance.
inline __m256 Exp2(__m256 x) {
  const __m256 shift = _mm256_set1_ps(12583039.0f);  // 1.5 * 2^23 + 127
  x = _mm256_max_ps(x, _mm256_set1_ps(-127.0f));
  const __m256 j = _mm256_add_ps(x, shift);
  const __m256 f = _mm256_sub_ps(x, _mm256_sub_ps(j, shift));
  __m256 p = _mm256_set1_ps(9.570101276040077e-3f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.591786280274391e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.40247443318367e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931217908859253e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.999992847442627e-1f));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(j), 23)));
}

inline float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Calls body(std::integral_constant<int, M>{}, r) over row blocks [r, r + M) that cover [0, rows):
// blocks of MR, then one shorter remainder block, so every kernel sees a compile-time row count.
template <int MR, typename Body>
inline void RowRemainder(int left, int r, Body& body) {
  if constexpr (MR > 0) {
    if (left == MR) {
      body(std::integral_constant<int, MR>{}, r);
    } else {
      RowRemainder<MR - 1>(left, r, body);
    }
  }
}

template <int MR, typename Body>
inline void ForRowBlocks(int rows, Body&& body) {
  int r = 0;
  for (; r + MR <= rows; r += MR) body(std::integral_constant<int, MR>{}, r);
  RowRemainder<MR - 1>(rows - r, r, body);
}

// Scores of MR query rows x NP adjacent 16-key panels into acc[MR][2 * NP]. The main shape,
// 3 rows x 2 panels (12 accumulators + 4 key vectors + 1 broadcast = 16 ymm registers), loads 4
// key vectors and broadcasts 3 query values per 12 FMAs; it measured ~8% faster than 6 rows x 1
// panel (2 loads + 6 broadcasts per 12 FMAs), the same shape as the PV kernel.
template <int MR, int NP>
inline void QkPanels(const float* q, int64_t ldq, const float* panel, int head_size, __m256 (&acc)[MR][2 * NP]) {
  const int64_t panel_size = static_cast<int64_t>(head_size) * kPanelWidth;
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int k = 0; k < 2 * NP; ++k) acc[r][k] = _mm256_setzero_ps();
  }
  for (int d = 0; d < head_size; ++d) {
    __m256 kv[2 * NP];
#pragma GCC unroll 2
    for (int j = 0; j < NP; ++j) {
      kv[2 * j] = _mm256_loadu_ps(panel + j * panel_size + d * kPanelWidth);
      kv[2 * j + 1] = _mm256_loadu_ps(panel + j * panel_size + d * kPanelWidth + 8);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 qv = _mm256_broadcast_ss(q + r * ldq + d);
#pragma GCC unroll 4
      for (int k = 0; k < 2 * NP; ++k) acc[r][k] = _mm256_fmadd_ps(qv, kv[k], acc[r][k]);
    }
  }
}

// Calls tile(p, acc) with the scores of panels p, p + 1 (acc[MR][4]) over all panels, the last
// one alone (acc[MR][2]) when their count is odd.
template <int MR, typename Tile>
inline void ForPanelPairs(const float* q, int64_t ldq, const float* k_panels, int panels, int head_size,
                          Tile&& tile) {
  const int64_t panel_size = static_cast<int64_t>(head_size) * kPanelWidth;
  int p = 0;
  for (; p + 2 <= panels; p += 2) {
    __m256 acc[MR][4];
    QkPanels<MR, 2>(q, ldq, k_panels + p * panel_size, head_size, acc);
    tile(p, acc);
  }
  if (p < panels) {
    __m256 acc[MR][2];
    QkPanels<MR, 1>(q, ldq, k_panels + p * panel_size, head_size, acc);
    tile(p, acc);
  }
}

template <typename Acc>
constexpr int kVectors = std::extent<std::remove_reference_t<Acc>, 1>::value;

template <int MR>
inline void QkRows(const float* q, int64_t ldq, const float* k_panels, int panels, int head_size, float* s,
                   int64_t lds) {
  ForPanelPairs<MR>(q, ldq, k_panels, panels, head_size, [&](int p, auto& acc) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
      for (int k = 0; k < kVectors<decltype(acc)>; ++k) {
        _mm256_storeu_ps(s + r * lds + p * kPanelWidth + 8 * k, acc[r][k]);
      }
    }
  });
}

void QkAvx2(const float* q, int64_t ldq, int rows, const float* k_panels, int panels, int head_size, float* s,
            int64_t lds) {
  ForRowBlocks<3>(rows, [&](auto mr, int r) {
    QkRows<decltype(mr)::value>(q + r * ldq, ldq, k_panels, panels, head_size, s + r * lds, lds);
  });
}

// Max of a row of n16 scores (a multiple of 16).
inline float RowMax(const float* row, int n16) {
  __m256 m0 = _mm256_loadu_ps(row), m1 = _mm256_loadu_ps(row + 8);
  for (int c = 16; c < n16; c += 16) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(row + c));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(row + c + 8));
  }
  return HorizontalMax(_mm256_max_ps(m0, m1));
}

// P = 2^(S - ref[r]) in place over rows x n16 scores, sums[r] = sum of row r's P; returns the
// largest S - ref[r] seen. Two vectors per step, each with its own sum, keep the exp2 chains of
// neighbouring vectors independent.
inline float ExpAgainstReference(float* s, int64_t lds, int rows, int n16, const float* ref, float* sums) {
  __m256 excess = _mm256_set1_ps(kNegInf);
  for (int r = 0; r < rows; ++r) {
    float* row = s + r * lds;
    const __m256 m = _mm256_set1_ps(ref[r]);
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    for (int c = 0; c < n16; c += 16) {
      const __m256 x0 = _mm256_sub_ps(_mm256_loadu_ps(row + c), m);
      const __m256 x1 = _mm256_sub_ps(_mm256_loadu_ps(row + c + 8), m);
      excess = _mm256_max_ps(excess, _mm256_max_ps(x0, x1));
      const __m256 p0 = Exp2(x0), p1 = Exp2(x1);
      _mm256_storeu_ps(row + c, p0);
      _mm256_storeu_ps(row + c + 8, p1);
      sum0 = _mm256_add_ps(sum0, p0);
      sum1 = _mm256_add_ps(sum1, p1);
    }
    sums[r] = HorizontalSum(_mm256_add_ps(sum0, sum1));
  }
  return HorizontalMax(excess);
}

// QK^T, then the exponentials in a second pass over the scores while they are still in L1
// (6 rows x 128 keys, 3 KB). Folding exp2 into the QK^T tile's registers instead times the same
// (A/B of the two libraries in one process, sequence 512) for twice the code: with all 16 ymm
// registers holding accumulators, its polynomial constants are re-read from the stack for
// every vector.
bool QkExpAvx2(const float* q, int64_t ldq, int rows, const float* k_panels, int n, int head_size, float* ref_max,
               float* p, int64_t lds, float* row_sum) {
  const int panels = (n + kPanelWidth - 1) / kPanelWidth, n16 = panels * kPanelWidth;
  QkAvx2(q, ldq, rows, k_panels, panels, head_size, p, lds);
  float refs[kMaxQkExpRows], sums[kMaxQkExpRows];
  for (int r = 0; r < rows; ++r) {
    float* row = p + r * lds;
    for (int c = n; c < n16; ++c) row[c] = kNegInf;  // filler keys: exp2 gives exactly 0
    // A row without a reference yet (no key seen) takes the max of these scores.
    refs[r] = ref_max[r] != kNegInf ? ref_max[r] : RowMax(row, n16);
  }
  // Checked before row_sum / ref_max change, so a failed call leaves no trace.
  if (ExpAgainstReference(p, lds, rows, n16, refs, sums) > kMaxExcess) return false;
  for (int r = 0; r < rows; ++r) {
    ref_max[r] = refs[r];
    row_sum[r] += sums[r];
  }
  return true;
}

// Rows are handled 8 at a time in two passes: first every row's tile max (and, in one vector,
// the rows' rescale factors), then the exponentials. The second pass has no dependency from one
// row to the next, so the out-of-order core overlaps rows instead of waiting on each row's
// max -> exp2 -> horizontal-sum chain.
void SoftmaxAvx2(float* s, int64_t lds, int rows, int n, float* row_max, float* row_sum, float* alpha) {
  const int n8 = (n + 7) & ~7;
  for (int r0 = 0; r0 < rows; r0 += 8) {
    const int count = rows - r0 < 8 ? rows - r0 : 8;
    alignas(32) float old_max[8] = {}, new_max[8] = {}, scale[8];
    for (int r = 0; r < count; ++r) {
      float* row = s + (r0 + r) * lds;
      for (int c = n; c < n8; ++c) row[c] = kNegInf;  // pad to whole vectors; exp2 turns them into 0
      __m256 m0 = _mm256_loadu_ps(row), m1 = m0;
      int c = 8;
      for (; c + 16 <= n8; c += 16) {
        m0 = _mm256_max_ps(m0, _mm256_loadu_ps(row + c));
        m1 = _mm256_max_ps(m1, _mm256_loadu_ps(row + c + 8));
      }
      if (c < n8) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(row + c));
      const float tile_max = HorizontalMax(_mm256_max_ps(m0, m1));
      old_max[r] = row_max[r0 + r];
      new_max[r] = old_max[r] > tile_max ? old_max[r] : tile_max;
    }
    // old - new <= 0; -inf (first visible keys) gives alpha 0. NaN (both -inf) is replaced below.
    _mm256_store_ps(scale, Exp2(_mm256_sub_ps(_mm256_load_ps(old_max), _mm256_load_ps(new_max))));
    for (int r = 0; r < count; ++r) {
      float* row = s + (r0 + r) * lds;
      if (new_max[r] == kNegInf) {  // everything masked so far: keep the row empty
        for (int c = 0; c < n8; c += 8) _mm256_storeu_ps(row + c, _mm256_setzero_ps());
        alpha[r0 + r] = 1.0f;
        continue;
      }
      const __m256 vmax = _mm256_set1_ps(new_max[r]);
      __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
      int c = 0;
      for (; c + 16 <= n8; c += 16) {
        const __m256 p0 = Exp2(_mm256_sub_ps(_mm256_loadu_ps(row + c), vmax));
        const __m256 p1 = Exp2(_mm256_sub_ps(_mm256_loadu_ps(row + c + 8), vmax));
        _mm256_storeu_ps(row + c, p0);
        _mm256_storeu_ps(row + c + 8, p1);
        sum0 = _mm256_add_ps(sum0, p0);
        sum1 = _mm256_add_ps(sum1, p1);
      }
      if (c < n8) {
        const __m256 p0 = Exp2(_mm256_sub_ps(_mm256_loadu_ps(row + c), vmax));
        _mm256_storeu_ps(row + c, p0);
        sum0 = _mm256_add_ps(sum0, p0);
      }
      alpha[r0 + r] = scale[r];
      row_max[r0 + r] = new_max[r];
      row_sum[r0 + r] = row_sum[r0 + r] * scale[r] + HorizontalSum(_mm256_add_ps(sum0, sum1));
    }
  }
}

inline void PackOneKey(const float* src, int head_size, float* panels, int64_t slot) {
  float* column = panels + (slot / kPanelWidth) * head_size * kPanelWidth + slot % kPanelWidth;
  for (int d = 0; d < head_size; ++d) column[d * kPanelWidth] = src[d];
}

// Key packing is a transpose; doing it 8 keys x 8 dimensions at a time in registers keeps it
// far below the cost of the QK^T tile that reads it.
void PackKeysAvx2(const float* src, int64_t ld, int count, int head_size, float* panels, int64_t slot0) {
  int i = 0;
  for (; i < count && (slot0 + i) % 8 != 0; ++i) PackOneKey(src + i * ld, head_size, panels, slot0 + i);
  for (; i + 8 <= count; i += 8) {
    // Source rows are strided (H_kv * D floats apart): ask for the next 8 a step ahead.
    for (int k = 8; k < 16 && i + k < count; ++k) {
      for (int d = 0; d < head_size; d += 16) __builtin_prefetch(src + (i + k) * ld + d);
    }
    const int64_t slot = slot0 + i;
    float* base = panels + (slot / kPanelWidth) * head_size * kPanelWidth + slot % kPanelWidth;
    const float* rows = src + i * ld;
    int d = 0;
    for (; d + 8 <= head_size; d += 8) {
      __m256 r[8], t[8];
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(rows + k * ld + d);
#pragma GCC unroll 4
      for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
      }
#pragma GCC unroll 2
      for (int k = 0; k < 8; k += 4) {
        r[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        _mm256_storeu_ps(base + (d + k) * kPanelWidth, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
        _mm256_storeu_ps(base + (d + k + 4) * kPanelWidth, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
      }
    }
    for (; d < head_size; ++d) {
      for (int k = 0; k < 8; ++k) base[d * kPanelWidth + k] = rows[k * ld + d];
    }
  }
  for (; i < count; ++i) PackOneKey(src + i * ld, head_size, panels, slot0 + i);
}

// MR rows x NV*8 output columns kept in registers across the whole key loop.
template <int MR, int NV>
inline void PvBlock(const float* p, int64_t lds, int n, const float* v, int64_t ldv, float* o, int64_t ldo,
                    const float* alpha) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m256 a = _mm256_set1_ps(alpha[r]);
#pragma GCC unroll 4
    for (int k = 0; k < NV; ++k) acc[r][k] = _mm256_mul_ps(a, _mm256_loadu_ps(o + r * ldo + 8 * k));
  }
  for (int c = 0; c < n; ++c) {
    __m256 vc[NV];
#pragma GCC unroll 4
    for (int k = 0; k < NV; ++k) vc[k] = _mm256_loadu_ps(v + c * ldv + 8 * k);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 pr = _mm256_broadcast_ss(p + r * lds + c);
#pragma GCC unroll 4
      for (int k = 0; k < NV; ++k) acc[r][k] = _mm256_fmadd_ps(pr, vc[k], acc[r][k]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int k = 0; k < NV; ++k) _mm256_storeu_ps(o + r * ldo + 8 * k, acc[r][k]);
  }
}

template <int MR>
inline void PvRows(const float* p, int64_t lds, int n, const float* v, int64_t ldv, float* o, int64_t ldo,
                   int width, const float* alpha) {
  int col = 0;
  for (; col + 16 <= width; col += 16) PvBlock<MR, 2>(p, lds, n, v + col, ldv, o + col, ldo, alpha);
  if (col < width) PvBlock<MR, 1>(p, lds, n, v + col, ldv, o + col, ldo, alpha);
}

void PvAvx2(const float* p, int64_t lds, int rows, int n, const float* v, int64_t ldv, float* o, int64_t ldo,
            int width, const float* alpha) {
  if (width == 32) {
    // Head size 32 (BERT-small, MiniLM, ...): all 4 column vectors in one pass, 3 rows at a
    // time, so each P value is broadcast once instead of once per 16 columns.
    ForRowBlocks<3>(rows, [&](auto mr, int r) {
      PvBlock<decltype(mr)::value, 4>(p + r * lds, lds, n, v, ldv, o + r * ldo, ldo, alpha + r);
    });
    return;
  }
  ForRowBlocks<6>(rows, [&](auto mr, int r) {
    PvRows<decltype(mr)::value>(p + r * lds, lds, n, v, ldv, o + r * ldo, ldo, width, alpha + r);
  });
}

}  // namespace

const TileKernels* Avx2TileKernels() {
  static const TileKernels kernels{"avx2", QkAvx2, QkExpAvx2, SoftmaxAvx2, PackKeysAvx2, PvAvx2};
  return &kernels;
}

}  // namespace onnxpress
