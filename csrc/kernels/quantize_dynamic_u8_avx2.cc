// QuantizeDynamicU8's AVX2 kernels. Compiled with -mavx2 -mfma (CMakeLists.txt); called only
// when IsaSupported(Isa::kAvx2). Tails go through the reference's own QuantizeOne / Fold*.
#include <immintrin.h>

#include "kernels/quantize_dynamic_u8_kernels.h"

namespace onnxq::qdu8 {

void MinMaxAvx2(const float* x, size_t n, float* mn, float* mx) {
  // Four accumulators each: one min and one max chain is bound by vminps' latency, not its
  // throughput.
  __m256 vmin[4], vmax[4];
  for (int k = 0; k < 4; ++k) {
    vmin[k] = _mm256_set1_ps(*mn);
    vmax[k] = _mm256_set1_ps(*mx);
  }
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int k = 0; k < 4; ++k) {
      const __m256 v = _mm256_loadu_ps(x + i + 8 * k);
      vmin[k] = _mm256_min_ps(v, vmin[k]);  // = FoldMin(v, vmin) lane by lane
      vmax[k] = _mm256_max_ps(v, vmax[k]);
    }
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vmin[0] = _mm256_min_ps(v, vmin[0]);
    vmax[0] = _mm256_max_ps(v, vmax[0]);
  }
  alignas(32) float lanes_min[4][8], lanes_max[4][8];
  for (int k = 0; k < 4; ++k) {
    _mm256_store_ps(lanes_min[k], vmin[k]);
    _mm256_store_ps(lanes_max[k], vmax[k]);
  }
  for (int k = 0; k < 4; ++k) {
    for (int lane = 0; lane < 8; ++lane) {  // exact in any order: min/max do not round, and hold no NaN
      *mn = FoldMin(lanes_min[k][lane], *mn);
      *mx = FoldMax(lanes_max[k][lane], *mx);
    }
  }
  for (; i < n; ++i) {
    *mn = FoldMin(x[i], *mn);
    *mx = FoldMax(x[i], *mx);
  }
}

namespace {

// Eight elements: QuantizeOne lane by lane (cvtps2dq rounds half to even, like nearbyintf).
inline __m256i Quantize8(const float* x, __m256 scale, __m256 lo, __m256 hi, __m256i zero_point) {
  __m256 v = _mm256_div_ps(_mm256_loadu_ps(x), scale);
  v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
  return _mm256_add_epi32(_mm256_cvtps_epi32(v), zero_point);
}

}  // namespace

void QuantizeAvx2(const float* x, size_t n, const Params& p, uint8_t* y) {
  const __m256 scale = _mm256_set1_ps(p.scale), lo = _mm256_set1_ps(p.lo), hi = _mm256_set1_ps(p.hi);
  const __m256i zero_point = _mm256_set1_epi32(p.zero_point);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i a = Quantize8(x + i, scale, lo, hi, zero_point);
    const __m256i b = Quantize8(x + i + 8, scale, lo, hi, zero_point);
    const __m256i c = Quantize8(x + i + 16, scale, lo, hi, zero_point);
    const __m256i d = Quantize8(x + i + 24, scale, lo, hi, zero_point);
    // Values are in [0, 255], so the saturating packs are exact. They work per 128-bit half,
    // leaving 4-byte groups in the order a0 b0 c0 d0 a1 b1 c1 d1; the permute restores a b c d.
    const __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), _mm256_permutevar8x32_epi32(bytes, order));
  }
  for (; i < n; ++i) y[i] = QuantizeOne(x[i], p);
}

}  // namespace onnxq::qdu8
