// QuantizeDynamicU8's AVX-512 kernels. Compiled with -mavx512f -mavx512bw -mavx512vnni
// (CMakeLists.txt); called only when IsaSupported(Isa::kAvx512). Masked loads and stores handle
// the tail, so every element goes through the same instructions.
#include <immintrin.h>

#include "kernels/quantize_dynamic_u8_kernels.h"

namespace onnxq::qdu8 {

namespace {

// The lanes of a 16-wide block starting at i that lie inside [0, n).
inline __mmask16 BlockMask(size_t i, size_t n) {
  return n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
}

}  // namespace

void MinMaxAvx512(const float* x, size_t n, float* mn, float* mx) {
  __m512 vmin = _mm512_set1_ps(*mn), vmax = _mm512_set1_ps(*mx);
  for (size_t i = 0; i < n; i += 16) {
    const __mmask16 m = BlockMask(i, n);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    vmin = _mm512_mask_min_ps(vmin, m, v, vmin);  // = FoldMin(v, vmin) in the lanes inside X
    vmax = _mm512_mask_max_ps(vmax, m, v, vmax);
  }
  // Exact in any order: min/max do not round, and the lanes hold no NaN. (Not with
  // _mm512_reduce_min_ps: GCC 12's version of it warns about its own uninitialized variables.)
  alignas(64) float lanes_min[16], lanes_max[16];
  _mm512_store_ps(lanes_min, vmin);
  _mm512_store_ps(lanes_max, vmax);
  for (int lane = 0; lane < 16; ++lane) {
    *mn = FoldMin(lanes_min[lane], *mn);
    *mx = FoldMax(lanes_max[lane], *mx);
  }
}

void QuantizeAvx512(const float* x, size_t n, const Params& p, uint8_t* y) {
  const __m512 scale = _mm512_set1_ps(p.scale), lo = _mm512_set1_ps(p.lo), hi = _mm512_set1_ps(p.hi);
  const __m512i zero_point = _mm512_set1_epi32(p.zero_point);
  for (size_t i = 0; i < n; i += 16) {
    const __mmask16 m = BlockMask(i, n);
    // QuantizeOne lane by lane (cvtps2dq rounds half to even, like nearbyintf).
    __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + i), scale);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    const __m512i q = _mm512_add_epi32(_mm512_maskz_cvtps_epi32(m, v), zero_point);
    _mm512_mask_cvtusepi32_storeu_epi8(y + i, m, q);  // values are in [0, 255]: exact narrowing
  }
}

}  // namespace onnxq::qdu8
