// The numeric core of QuantizeDynamicU8, shared by the scalar reference (quantize_dynamic_u8.cc)
// and the SIMD kernels (quantize_dynamic_u8_simd.h, compiled per instruction set in kernels_avx2.cc
// and kernels_avx512.cc). It includes no onnxruntime or standard-library templates, and its inline
// helpers have internal linkage (anonymous namespace): an inline function with external linkage
// compiled inside an -mavx512f file could be the copy the linker keeps for every caller, and crash
// CPUs without AVX-512.
#pragma once

#include <math.h>  // nearbyintf: rounds half to even in the default rounding mode, like cvtps2dq

#include <cstddef>
#include <cstdint>

namespace onnxq::qdu8 {

// Y = zero_point + round(clamp(X / scale, lo, hi)); lo = -zero_point and hi = 255 - zero_point
// keep Y in [0, 255].
struct Params {
  float scale, lo, hi;
  int32_t zero_point;
};

namespace {

// min/max folds written as (v < acc ? v : acc): what minps/maxps(v, acc) compute, so a NaN in v
// is skipped the same way by every kernel.
inline float FoldMin(float v, float acc) { return v < acc ? v : acc; }
inline float FoldMax(float v, float acc) { return v > acc ? v : acc; }

// One element, in the order the SIMD kernels use: divide, clamp (maxps then minps: NaN -> lo),
// round half to even, add the zero point.
inline uint8_t QuantizeOne(float x, const Params& p) {
  float v = x / p.scale;
  v = v > p.lo ? v : p.lo;
  v = v < p.hi ? v : p.hi;
  return static_cast<uint8_t>(static_cast<int32_t>(nearbyintf(v)) + p.zero_point);
}

}  // namespace

// Scale and zero point from X's range [mn, mx], as onnxruntime's DynamicQuantizeLinear computes
// them (quantize_dynamic_u8.cc; PostConv/IntConv use it too).
Params MakeParams(float mn, float mx);

// The reference kernels (the SIMD ones: quantize_dynamic_u8_simd.h, through kernels.h's tables):
// MinMaxScalar folds x[0, n) into *mn / *mx (which start at +inf / -inf); QuantizeScalar writes
// y[0, n).
void MinMaxScalar(const float* x, size_t n, float* mn, float* mx);
void QuantizeScalar(const float* x, size_t n, const Params& p, uint8_t* y);

// IntConv's per-pixel steps (int_conv.h, x_steps = "pixel") over one image of `channels` planes of
// `pixels` floats (x[c * pixels + p]): pixel p's Params as four arrays of `pixels` (MakeParams of
// its range), so that the SIMD kernels load a vector of pixels' steps at once.
struct PixelSteps {
  float* scale;
  float* lo;
  float* hi;
  int32_t* zero_point;
  float* inverse;  // the SIMD kernels' 1 / scale or 0 (int_conv_kernels.h, FusedInverse)
  bool divide;     // some pixel's inverse is 0: the SIMD kernels divide every value
};

// MinMaxPixelsScalar: pixel p's range over its channels into mn[p], mx[p] (set here; FoldMin /
// FoldMax from +inf / -inf, NaN skipped). QuantizePixelsScalar: y[c * pixels + p] =
// QuantizeOne(x[c * pixels + p], pixel p's steps).
void MinMaxPixelsScalar(const float* x, int64_t channels, int64_t pixels, float* mn, float* mx);
void QuantizePixelsScalar(const float* x, int64_t channels, int64_t pixels, const PixelSteps& s, uint8_t* y);

}  // namespace onnxq::qdu8
