// libonnxq_stats.so: a value's code on a uniform grid and what a code stands for, in the float32 steps of
// onnxq/numerics/uniform.py (to_domain, nearest_codes, decoded), so that the C loops that round weights
// (diagonal_error.cc, gptq_block.cc) give numpy's codes bit for bit. Always inlined: the loops are built
// again for AVX2 and AVX-512 (target_clones), and these steps must be built with them.
#pragma once

#include <cmath>

namespace onnxq_stats {

// numpy.rint of x (|x| <= 2^22), ties to even, under the default rounding mode: adding and subtracting
// 1.5 * 2^23 leaves no fraction bits (SSE2 vectorises this; rint itself needs SSE4.1). The library is
// built without fast-math, so the two steps stay.
__attribute__((always_inline)) inline float RoundHalfEven(float x) {
  const float magic = 12582912.0f;
  return (x + magic) - magic;
}

// The value in the grid's domain: sign(v) sqrt|v| for sqrt codes, v itself otherwise.
__attribute__((always_inline)) inline float ToDomain(float v, bool sqrt_codes) {
  const float sign = v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f);
  return sqrt_codes ? sign * std::sqrt(std::fabs(v)) : v;
}

// The code of a value already in the grid's domain: divided by the row's scale, rounded, clipped to
// [-q, q] (clipping first gives the same code: q is whole).
__attribute__((always_inline)) inline float NearestCode(float domain, float scale, float q) {
  const float quotient = domain / scale;
  return RoundHalfEven(quotient < -q ? -q : (quotient > q ? q : quotient));
}

// What a code stands for: code * scale, times its magnitude for sqrt codes.
__attribute__((always_inline)) inline float CodeValue(float code, float scale, bool sqrt_codes) {
  const float y = code * scale;
  return sqrt_codes ? y * std::fabs(y) : y;
}

}  // namespace onnxq_stats
