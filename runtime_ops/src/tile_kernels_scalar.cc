// Portable reference versions of the attention tile loops (also the non-AVX2 fallback).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "tile_kernels.h"

namespace onnxpress {
namespace {

void QkScalar(const float* q, int64_t ldq, int rows, const float* k_panels, int panels, int head_size,
              float* s, int64_t lds) {
  for (int r = 0; r < rows; ++r) {
    const float* q_row = q + r * ldq;
    for (int p = 0; p < panels; ++p) {
      const float* panel = k_panels + static_cast<int64_t>(p) * head_size * kPanelWidth;
      float acc[kPanelWidth] = {};
      for (int d = 0; d < head_size; ++d) {
        const float qd = q_row[d];
        for (int c = 0; c < kPanelWidth; ++c) acc[c] += qd * panel[d * kPanelWidth + c];
      }
      std::memcpy(s + r * lds + p * kPanelWidth, acc, sizeof(acc));
    }
  }
}

bool QkExpScalar(const float* q, int64_t ldq, int rows, const float* k_panels, int n, int head_size,
                 float* ref_max, float* p, int64_t lds, float* row_sum) {
  const int panels = (n + kPanelWidth - 1) / kPanelWidth;
  QkScalar(q, ldq, rows, k_panels, panels, head_size, p, lds);
  float sums[kMaxQkExpRows] = {}, refs[kMaxQkExpRows];
  for (int r = 0; r < rows; ++r) {
    float* row = p + r * lds;
    refs[r] = ref_max[r] != -std::numeric_limits<float>::infinity() ? ref_max[r] : *std::max_element(row, row + n);
    for (int c = 0; c < n; ++c) {
      const float x = row[c] - refs[r];
      if (x > kMaxExcess) return false;
      row[c] = std::exp2(x);
      sums[r] += row[c];
    }
    std::fill(row + n, row + panels * kPanelWidth, 0.0f);
  }
  for (int r = 0; r < rows; ++r) {
    ref_max[r] = refs[r];
    row_sum[r] += sums[r];
  }
  return true;
}

void SoftmaxScalar(float* s, int64_t lds, int rows, int n, float* row_max, float* row_sum, float* alpha) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < rows; ++r) {
    float* row = s + r * lds;
    float tile_max = kNegInf;
    for (int c = 0; c < n; ++c) tile_max = std::fmax(tile_max, row[c]);
    const float new_max = std::fmax(row_max[r], tile_max);
    if (new_max == kNegInf) {  // everything masked so far: keep the row empty
      std::memset(row, 0, sizeof(float) * n);
      alpha[r] = 1.0f;
      continue;
    }
    alpha[r] = std::exp2(row_max[r] - new_max);
    float sum = 0.0f;
    for (int c = 0; c < n; ++c) {
      row[c] = std::exp2(row[c] - new_max);
      sum += row[c];
    }
    row_max[r] = new_max;
    row_sum[r] = row_sum[r] * alpha[r] + sum;
  }
}

void PackKeysScalar(const float* src, int64_t ld, int count, int head_size, float* panels, int64_t slot0) {
  for (int i = 0; i < count; ++i) {
    const int64_t slot = slot0 + i;
    float* column = panels + (slot / kPanelWidth) * head_size * kPanelWidth + slot % kPanelWidth;
    for (int d = 0; d < head_size; ++d) column[d * kPanelWidth] = src[i * ld + d];
  }
}

void PvScalar(const float* p, int64_t lds, int rows, int n, const float* v, int64_t ldv, float* o, int64_t ldo,
              int width, const float* alpha) {
  for (int r = 0; r < rows; ++r) {
    float* o_row = o + r * ldo;
    for (int d = 0; d < width; ++d) o_row[d] *= alpha[r];
    for (int c = 0; c < n; ++c) {
      const float pc = p[r * lds + c];
      if (pc == 0.0f) continue;
      const float* v_row = v + c * ldv;
      for (int d = 0; d < width; ++d) o_row[d] += pc * v_row[d];
    }
  }
}

}  // namespace

const TileKernels& ScalarTileKernels() {
  static const TileKernels kernels{"scalar", QkScalar, QkExpScalar, SoftmaxScalar, PackKeysScalar, PvScalar};
  return kernels;
}

const TileKernels& SelectTileKernels() {
  const char* forced = std::getenv("ONNXPRESS_OPS_SIMD");
  if (forced && std::strcmp(forced, "scalar") == 0) return ScalarTileKernels();
  const TileKernels* avx2 = Avx2TileKernels();
  if (avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return *avx2;
  return ScalarTileKernels();
}

}  // namespace onnxpress

#ifndef ONNXPRESS_HAVE_AVX2
namespace onnxpress {
const TileKernels* Avx2TileKernels() { return nullptr; }
}  // namespace onnxpress
#endif
