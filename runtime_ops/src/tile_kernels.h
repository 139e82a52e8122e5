// Inner loops of the CPU flash-attention kernel, one set per instruction set.
//
// The AVX2 set lives in its own translation unit compiled with -mavx2 -mfma and is only
// picked after a runtime CPU check, so the library still runs on CPUs without AVX2.
#pragma once

#include <cstdint>

namespace onnxpress {

// Keys are packed in panels of kPanelWidth keys: panel[d][c] = K[panel_start + c][d], so the
// QK^T inner loop reads one contiguous 64-byte row per head-dimension step.
constexpr int kPanelWidth = 16;

// qk_exp works against a reference max per row instead of the exact running max, and gives up
// (so the caller falls back to qk + softmax) once a score exceeds it by more than this (log2
// units): probabilities stay below 2^kMaxExcess, far from float overflow, and the output is
// unchanged because the final division by the row sum cancels any common factor.
constexpr float kMaxExcess = 16.0f;
constexpr int kMaxQkExpRows = 8;

struct TileKernels {
  const char* name;

  // S[r][c] = sum_d Q[r][d] * K[c][d] for r < rows and c < panels * kPanelWidth.
  void (*qk)(const float* q, int64_t ldq, int rows, const float* k_panels, int panels, int head_size,
             float* s, int64_t lds);

  // Fused QK^T + softmax numerator for keys of which none is masked: P[r][c] = 2^(S[r][c] - ref_max[r])
  // for r < rows <= kMaxQkExpRows and c < n (P = 0 for n <= c < round_up(n, kPanelWidth)), and
  // row_sum[r] += sum_c P[r][c]. A row whose ref_max is -inf (no key seen yet) first sets it from
  // its own scores of this call. Returns false, leaving row_sum and ref_max unchanged, if some
  // S[r][c] - ref_max[r] exceeds kMaxExcess (the caller then redoes the keys with qk + softmax).
  bool (*qk_exp)(const float* q, int64_t ldq, int rows, const float* k_panels, int n, int head_size,
                 float* ref_max, float* p, int64_t lds, float* row_sum);

  // One online-softmax step over scores S[r][0..n) (base-2 logits). Updates the running
  // row_max / row_sum, writes alpha[r] = 2^(old_max - new_max) for rescaling the output and
  // replaces S by P = 2^(S - new_max). Rows whose scores are all -inf get P = 0, alpha = 1.
  // May overwrite S[r][n .. round_up(n, 8)).
  void (*softmax)(float* s, int64_t lds, int rows, int n, float* row_max, float* row_sum, float* alpha);

  // Writes `count` keys (rows src + i * ld, head_size floats each) into key slots slot0 .. slot0+count
  // of the panel layout: slot s, dimension d lands at panels[(s / 16) * head_size * 16 + d * 16 + s % 16].
  void (*pack_keys)(const float* src, int64_t ld, int count, int head_size, float* panels, int64_t slot0);

  // O[r][0..width) = alpha[r] * O[r] + sum_{c < n} P[r][c] * V[c][0..width). width % 8 == 0.
  void (*pv)(const float* p, int64_t lds, int rows, int n, const float* v, int64_t ldv, float* o,
             int64_t ldo, int width, const float* alpha);
};

const TileKernels& ScalarTileKernels();

// nullptr when the library was built without the AVX2 translation unit.
const TileKernels* Avx2TileKernels();

// AVX2+FMA when the CPU has it, else scalar; ONNXPRESS_OPS_SIMD=scalar forces scalar (tests).
const TileKernels& SelectTileKernels();

}  // namespace onnxpress
