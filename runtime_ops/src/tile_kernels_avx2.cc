// AVX2 + FMA versions of the attention tile loops.
//
// This file alone is compiled with -mavx2 -mfma. It deliberately uses only intrinsics and
// functions local to this file: an inline template from a shared header instantiated here
// could be picked by the linker for the scalar path too and crash on CPUs without AVX2.
#include <immintrin.h>

#include "tile_kernels.h"

namespace onnxpress {
namespace {

constexpr float kNegInf = -__builtin_inff();

// 2^x for x <= 0, the only range the softmax needs (scores minus their running max).
// Round-to-nearest split x = n + f with |f| <= 0.5, then a degree-5 Taylor series of
// e^(f ln 2): relative error < 3e-6, far inside the op's 1e-4 tolerance. Inputs below -127
// (including -inf for masked keys) give exactly 0 through the exponent trick.
inline __m256 Exp2(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-127.0f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.3333558146428443e-3f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402265069591007e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471805599453e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

inline float Exp2Scalar(float x) { return _mm256_cvtss_f32(Exp2(_mm256_set1_ps(x))); }

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

// MR query rows x one 16-key panel per step: 12 accumulators + 2 key vectors + 1 broadcast
// fit the 16 ymm registers.
template <int MR>
inline void QkRows(const float* q, int64_t ldq, const float* k_panels, int panels, int head_size, float* s,
                   int64_t lds) {
  for (int p = 0; p < panels; ++p) {
    const float* panel = k_panels + static_cast<int64_t>(p) * head_size * kPanelWidth;
    __m256 acc[MR][2];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int d = 0; d < head_size; ++d) {
      const __m256 k0 = _mm256_loadu_ps(panel + d * kPanelWidth);
      const __m256 k1 = _mm256_loadu_ps(panel + d * kPanelWidth + 8);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m256 qv = _mm256_broadcast_ss(q + r * ldq + d);
        acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      _mm256_storeu_ps(s + r * lds + p * kPanelWidth, acc[r][0]);
      _mm256_storeu_ps(s + r * lds + p * kPanelWidth + 8, acc[r][1]);
    }
  }
}

void QkAvx2(const float* q, int64_t ldq, int rows, const float* k_panels, int panels, int head_size, float* s,
            int64_t lds) {
  int r = 0;
  for (; r + 6 <= rows; r += 6) QkRows<6>(q + r * ldq, ldq, k_panels, panels, head_size, s + r * lds, lds);
  q += r * ldq;
  s += r * lds;
  switch (rows - r) {
    case 5: QkRows<5>(q, ldq, k_panels, panels, head_size, s, lds); break;
    case 4: QkRows<4>(q, ldq, k_panels, panels, head_size, s, lds); break;
    case 3: QkRows<3>(q, ldq, k_panels, panels, head_size, s, lds); break;
    case 2: QkRows<2>(q, ldq, k_panels, panels, head_size, s, lds); break;
    case 1: QkRows<1>(q, ldq, k_panels, panels, head_size, s, lds); break;
    default: break;
  }
}

void SoftmaxAvx2(float* s, int64_t lds, int rows, int n, float* row_max, float* row_sum, float* alpha) {
  const int n8 = (n + 7) & ~7;
  for (int r = 0; r < rows; ++r) {
    float* row = s + r * lds;
    for (int c = n; c < n8; ++c) row[c] = kNegInf;  // pad to whole vectors; exp2 turns them into 0
    __m256 vmax = _mm256_set1_ps(kNegInf);
    for (int c = 0; c < n8; c += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(row + c));
    const float tile_max = HorizontalMax(vmax);
    const float new_max = row_max[r] > tile_max ? row_max[r] : tile_max;
    if (new_max == kNegInf) {  // everything masked so far: keep the row empty
      for (int c = 0; c < n8; c += 8) _mm256_storeu_ps(row + c, _mm256_setzero_ps());
      alpha[r] = 1.0f;
      continue;
    }
    alpha[r] = Exp2Scalar(row_max[r] - new_max);  // no libm call per row
    const __m256 vnew = _mm256_set1_ps(new_max);
    __m256 vsum = _mm256_setzero_ps();
    for (int c = 0; c < n8; c += 8) {
      const __m256 pc = Exp2(_mm256_sub_ps(_mm256_loadu_ps(row + c), vnew));
      _mm256_storeu_ps(row + c, pc);
      vsum = _mm256_add_ps(vsum, pc);
    }
    row_max[r] = new_max;
    row_sum[r] = row_sum[r] * alpha[r] + HorizontalSum(vsum);
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

// Head size 32 (BERT-small, MiniLM, ...): all 4 column vectors in one pass, 3 rows at a time,
// so each P value is broadcast once instead of once per 16 columns.
void PvWidth32(const float* p, int64_t lds, int rows, int n, const float* v, int64_t ldv, float* o, int64_t ldo,
               const float* alpha) {
  int r = 0;
  for (; r + 3 <= rows; r += 3) PvBlock<3, 4>(p + r * lds, lds, n, v, ldv, o + r * ldo, ldo, alpha + r);
  if (rows - r == 2) PvBlock<2, 4>(p + r * lds, lds, n, v, ldv, o + r * ldo, ldo, alpha + r);
  if (rows - r == 1) PvBlock<1, 4>(p + r * lds, lds, n, v, ldv, o + r * ldo, ldo, alpha + r);
}

void PvAvx2(const float* p, int64_t lds, int rows, int n, const float* v, int64_t ldv, float* o, int64_t ldo,
            int width, const float* alpha) {
  if (width == 32) {
    PvWidth32(p, lds, rows, n, v, ldv, o, ldo, alpha);
    return;
  }
  int r = 0;
  for (; r + 6 <= rows; r += 6) PvRows<6>(p + r * lds, lds, n, v, ldv, o + r * ldo, ldo, width, alpha + r);
  p += r * lds;
  o += r * ldo;
  alpha += r;
  switch (rows - r) {
    case 5: PvRows<5>(p, lds, n, v, ldv, o, ldo, width, alpha); break;
    case 4: PvRows<4>(p, lds, n, v, ldv, o, ldo, width, alpha); break;
    case 3: PvRows<3>(p, lds, n, v, ldv, o, ldo, width, alpha); break;
    case 2: PvRows<2>(p, lds, n, v, ldv, o, ldo, width, alpha); break;
    case 1: PvRows<1>(p, lds, n, v, ldv, o, ldo, width, alpha); break;
    default: break;
  }
}

}  // namespace

const TileKernels* Avx2TileKernels() {
  static const TileKernels kernels{"avx2", QkAvx2, SoftmaxAvx2, PackKeysAvx2, PvAvx2};
  return &kernels;
}

}  // namespace onnxpress
