// libonnxq_stats.so: the error that the diagonal range search minimises (onnxq/numerics/output_error.py,
// DiagonalError): per row and candidate scale, sum_k d_k (w_k - q_k)^2 with q the row rounded to nearest
// on a uniform grid.
//
// numpy takes five passes over every row for every candidate (divide, round, clip, decode, weigh), and
// the search tries ~18 candidates per row on each grid: on MiniLM a third of the quantization time. This
// is one pass per candidate with the same float32 codes and values (division, round half to even,
// clip, product, and the product with its magnitude for sqrt codes: the same operations numpy does, so
// the same codes), the error summed in float64 in the row's order (numpy's einsum sums in its own order:
// the errors agree to rounding, tests/test_output_error.py).
#include <cstdint>

#include "uniform_codes.h"

namespace {

// The value of x's code at `scale` on the grid of codes -q..q, x in the grid's domain.
template <bool kSqrt>
__attribute__((always_inline)) inline double Decoded(float x, float scale, float q) {
  return static_cast<double>(onnxq_stats::CodeValue(onnxq_stats::NearestCode(x, scale, q), scale, kSqrt));
}

// Lanes of the float64 sum: independent partial sums the compiler can keep in vector registers.
constexpr int64_t kLanes = 8;

template <bool kSqrt>
__attribute__((always_inline)) inline double RowError(const float* x, const double* w, const double* diagonal, int64_t k, float scale, float q) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const double delta = w[i + j] - Decoded<kSqrt>(x[i + j], scale, q);
      lanes[j] += delta * diagonal[i + j] * delta;
    }
  }
  for (; i < k; ++i) {
    const double delta = w[i] - Decoded<kSqrt>(x[i], scale, q);
    lanes[0] += delta * diagonal[i] * delta;
  }
  double sum = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) sum += lanes[j];
  return sum;
}

}  // namespace

// Built for the baseline x86-64 and again for AVX2 and AVX-512 (the loader picks by the CPU): the same
// operations, in wider registers.
// domain (rows, k) float32: the rows in the grid's domain (sign(w) sqrt|w| for sqrt codes); weights
// (rows, k) float64: the rows themselves; diagonal (k) float64; scales (rows, candidates) float32, each
// > 0; q the largest code; sqrt_codes nonzero for sqrt codes. out (rows, candidates) float64 receives the
// errors.
extern "C" __attribute__((visibility("default"), target_clones("avx512f", "avx2", "default"))) void onnxq_diagonal_error(int64_t rows, int64_t k, const float* domain,
                                                                         const double* weights, const double* diagonal,
                                                                         const float* scales, int64_t candidates, float q,
                                                                         int sqrt_codes, double* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < candidates; ++c) {
      const float scale = scales[r * candidates + c];
      out[r * candidates + c] = sqrt_codes ? RowError<true>(domain + r * k, weights + r * k, diagonal, k, scale, q)
                                           : RowError<false>(domain + r * k, weights + r * k, diagonal, k, scale, q);
    }
  }
}
