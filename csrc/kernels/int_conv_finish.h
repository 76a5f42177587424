// PostConv/IntConv's float epilogue (int_conv.h; Finish in int_conv_kernels.h) over an instruction
// set's vectors, written once over its traits T (simd_kernels.h): FinishLanes, which every SIMD
// kernel finishes its sums with, and the epilogues of the matrix products, FinishT (GemmT's C, rows
// in the lanes) and FinishRun (runs of Gemm's C). Lane by lane they are the same float32 operations
// in the same order as Finish (cvtdq2ps rounds like the scalar int -> float conversion), so they
// give its bits.
#pragma once

#include <immintrin.h>
#include <math.h>  // INFINITY

#include <cstdint>
#include <cstring>

#include "kernels/int_conv_gemm.h"
#include "kernels/int_conv_kernels.h"

namespace onnxq::iconv {

namespace {

// Finish lane by lane: acc_e, acc_o are the int32 sums with their zero-point corrections done
// (acc_o only read for PostConv), b the channels' biases (only read with bias). clip = false
// leaves the clip out, which is exact where lo, hi are the default bounds (-inf, +inf).
template <class T>
[[gnu::always_inline]] inline typename T::F FinishLanes(bool post, bool bias, typename T::I acc_e, typename T::I acc_o, typename T::F c_e,
                                 typename T::F c_o, typename T::F b, typename T::F lo, typename T::F hi,
                                 bool clip = true) {
  typename T::F y = T::Mul(T::ToFloat(acc_e), c_e);
  if (post) y = T::Add(y, T::Mul(T::ToFloat(acc_o), c_o));
  if (bias) y = T::Add(y, b);
  return clip ? T::Clip(y, lo, hi) : y;
}

// GemmT's C finished for channels [R b, R b + R), R = T::kFloats, a pixel at a time: the sums of a
// channel's rows (PostConv: its even and odd rows side by side in two lanes, added) in the lanes of
// one vector, the zero-point correction, factor and bias applied (Finish without the clip).
template <class T, bool kPost, bool kBias>
struct FinishTRows {
  using I = typename T::I;
  using F = typename T::F;
  static constexpr int R = T::kFloats;
  int64_t channels;  // of the block (the last one may have fewer than R)
  F bias;
  const int32_t *c0, *c1;
  I z0, z1;
  F f0, f1;
  const int32_t* z_pixels;  // per-pixel steps (FinishT): z0 the rows' sums of weights, f0 their weight scales
  const float* s_pixels;
  // The block's rows: R (IntConv) or 2R (PostConv) from r0, R to a vector, each at its place in
  // GemmT's blocks of kLanes rows (c_of); the second vector's only for PostConv and where the rows
  // are there (else they hold nothing any output needs).
  FinishTRows(const FinishT& f, int64_t b) {
    channels = f.channels - R * b < R ? f.channels - R * b : R;
    bias = kBias ? T::LoadFirstF(f.bias + R * b, channels) : T::ZeroF();
    const int64_t r0 = kPost ? 2 * R * b : R * b, r1 = r0 + R;
    auto c_of = [&](int64_t row) { return f.c + (row / kLanes) * kLanes * f.pixels + row % kLanes; };
    c0 = c_of(r0);
    c1 = kPost && 2 * f.channels > r1 ? c_of(r1) : nullptr;
    z0 = T::Load(f.z + r0);
    z1 = T::Load(f.z + r1);
    f0 = T::LoadF(f.factor + r0);
    f1 = T::LoadF(f.factor + r1);
    z_pixels = f.z_pixels;
    s_pixels = f.s_pixels;
  }
  // IntConv: pixel p's y of the block's channels, unclipped, from acc, its sums of the block's rows;
  // `started`: acc began at Start() (z0 taken off already; int32 sums are exact in any order).
  [[gnu::always_inline]] F Of(int64_t p, I acc, bool started = false) const {
    static_assert(!kPost, "PostConv's channels take two rows");
    if (z_pixels != nullptr) {  // per-pixel steps: z_x * row sum, s_x * scale[m] (int_conv.h)
      const I z = T::Mul32(T::Set32(z_pixels[p]), z0);
      const F factor = T::Mul(T::SetF(s_pixels[p]), f0);
      const F y = T::Mul(T::ToFloat(T::Sub32(acc, z)), factor);
      return kBias ? T::Add(y, bias) : y;
    }
    const F y = T::Mul(T::ToFloat(started ? acc : T::Sub32(acc, z0)), f0);
    return kBias ? T::Add(y, bias) : y;
  }
  // What Of's started sums begin at: -z0 (per-pixel steps: 0, z differing by pixel).
  I Start() const { return z_pixels != nullptr ? T::Zero() : T::Sub32(T::Zero(), z0); }
  // Pixel p's y of the block's channels, unclipped.
  [[gnu::always_inline]] F At(int64_t p) const {
    const int64_t at = p * kLanes;
    if constexpr (!kPost) return Of(p, T::Load(c0 + at));
    F v = T::Mul(T::ToFloat(T::Sub32(T::Load(c0 + at), z0)), f0);
    if (kPost) {  // each pair of lanes even + odd, the pairs of v then w in channel order
      const F w = T::Mul(T::ToFloat(T::Sub32(c1 != nullptr ? T::Load(c1 + at) : T::Zero(), z1)), f1);
      v = T::EvenLanes(T::Add(v, T::MoveHdup(v)), T::Add(w, T::MoveHdup(w)));
    }
    return kBias ? T::Add(v, bias) : v;
  }
};

// FinishT for channels [R b, R b + R), R = T::kFloats: FinishTRows' vector per pixel, clipped,
// transposed in registers so that each channel's R pixels are one vector: put(p0, count, y, channels)
// takes y[j], channel R b + j's pixels [p0, p0 + count) (lanes past count undefined), j < channels.
template <class T, bool kPost, bool kBias, class Put>
void FinishTBlock(const FinishT& f, int64_t b, Put& put) {
  using F = typename T::F;
  constexpr int R = T::kFloats;
  const FinishTRows<T, kPost, kBias> rows(f, b);
  const F clip_lo = T::SetF(f.clip_lo), clip_hi = T::SetF(f.clip_hi);
  const bool clip = f.clip_lo != -INFINITY || f.clip_hi != INFINITY;  // (the default bounds change no bits)
  for (int64_t p0 = 0; p0 < f.pixels; p0 += R) {
    const int64_t count = f.pixels - p0 < R ? f.pixels - p0 : R;
    F y[R];
    for (int i = 0; i < R; ++i) {
      if (i >= count) {
        y[i] = T::ZeroF();
        continue;
      }
      const F v = rows.At(p0 + i);
      y[i] = clip ? T::Clip(v, clip_lo, clip_hi) : v;
    }
    T::Transpose(y);
    put(p0, count, y, rows.channels);
  }
}

// FinishT into f.out (without an Output).
template <class T, bool kPost, bool kBias>
void FinishTOut(const FinishT& f, int64_t b) {
  constexpr int R = T::kFloats;
  auto put = [&](int64_t p0, int64_t count, const typename T::F* y, int64_t channels) {
    float* out = f.out + R * b * f.stride + p0;
    if (count == R) {
      for (int64_t j = 0; j < channels; ++j) T::StoreF(out + j * f.stride, y[j]);
    } else {
      for (int64_t j = 0; j < channels; ++j) T::MaskStoreF(out + j * f.stride, y[j], count);
    }
  };
  FinishTBlock<T, kPost, kBias>(f, b, put);
}

// FinishRun (int_conv_kernels.h) a vector at a time: whole vectors, then the last one ending at n
// (again over lanes the one before wrote: the same values), or for runs shorter than a vector its
// lanes alone.
template <class T, bool kPost, bool kBias>
void FinishRunLanes(const int32_t* e, const int32_t* o, int64_t n, int32_t z_e, int32_t z_o, float c_e, float c_o,
                    const float* bias, float lo, float hi, float* out) {
  using I = typename T::I;
  constexpr int64_t R = T::kFloats;
  const I ze = T::Set32(z_e), zo = T::Set32(z_o);
  const typename T::F ce = T::SetF(c_e), co = T::SetF(c_o), b = T::SetF(kBias ? *bias : 0.0f);
  const typename T::F clip_lo = T::SetF(lo), clip_hi = T::SetF(hi);
  auto finish = [&](I acc_e, I acc_o) {
    return FinishLanes<T>(kPost, kBias, T::Sub32(acc_e, ze), T::Sub32(acc_o, zo), ce, co, b, clip_lo, clip_hi);
  };
  if (n < R) {
    const I acc_o = kPost ? T::LoadFirst32(o, n) : T::Zero();
    T::StoreFirstF(out, finish(T::LoadFirst32(e, n), acc_o), n);
    return;
  }
  for (int64_t i = 0;; i += R) {
    if (i + R > n) i = n - R;
    T::StoreF(out + i, finish(T::Load(e + i), kPost ? T::Load(o + i) : T::Zero()));
    if (i + R == n) return;
  }
}

template <class T>
void FinishRunKernel(const int32_t* e, const int32_t* o, int64_t n, int32_t z_e, int32_t z_o, float c_e, float c_o,
                     const float* bias, float lo, float hi, float* out) {
  if (o == nullptr) {
    bias != nullptr ? FinishRunLanes<T, false, true>(e, o, n, z_e, z_o, c_e, c_o, bias, lo, hi, out)
                    : FinishRunLanes<T, false, false>(e, o, n, z_e, z_o, c_e, c_o, bias, lo, hi, out);
  } else {
    bias != nullptr ? FinishRunLanes<T, true, true>(e, o, n, z_e, z_o, c_e, c_o, bias, lo, hi, out)
                    : FinishRunLanes<T, true, false>(e, o, n, z_e, z_o, c_e, c_o, bias, lo, hi, out);
  }
}

// FinishPixels (int_conv_kernels.h) a vector of pixels at a time: each lane's correction
// z[i] * row_sum (int32, exact: |z * row_sum| <= 255 * 128 * 65536 < 2^31) and factor s[i] * scale,
// then Finish's float steps. Whole vectors, then the last one ending at n (its lanes again: the same
// values), or for runs shorter than a vector its lanes alone.
template <class T, bool kBias>
void FinishPixelsLanes(const int32_t* e, int64_t n, int32_t row_sum, const int32_t* z, const float* s, float scale,
                       const float* bias, float lo, float hi, float* out) {
  using I = typename T::I;
  using F = typename T::F;
  constexpr int64_t R = T::kFloats;
  const I sum = T::Set32(row_sum);
  const F w = T::SetF(scale), b = T::SetF(kBias ? *bias : 0.0f), clip_lo = T::SetF(lo), clip_hi = T::SetF(hi);
  auto finish = [&](I acc, I zx, F sx) {
    const F c = T::Mul(sx, w);  // s_x * scale[m], as int_conv.h computes it
    return FinishLanes<T>(false, kBias, T::Sub32(acc, T::Mul32(zx, sum)), T::Zero(), c, c, b, clip_lo, clip_hi);
  };
  if (n < R) {
    T::StoreFirstF(out, finish(T::LoadFirst32(e, n), T::LoadFirst32(z, n), T::LoadFirstF(s, n)), n);
    return;
  }
  for (int64_t i = 0;; i += R) {
    if (i + R > n) i = n - R;
    T::StoreF(out + i, finish(T::Load(e + i), T::Load(z + i), T::LoadF(s + i)));
    if (i + R == n) return;
  }
}

template <class T>
void FinishPixelsKernel(const int32_t* e, int64_t n, int32_t row_sum, const int32_t* z, const float* s, float scale,
                        const float* bias, float lo, float hi, float* out) {
  bias != nullptr ? FinishPixelsLanes<T, true>(e, n, row_sum, z, s, scale, bias, lo, hi, out)
                  : FinishPixelsLanes<T, false>(e, n, row_sum, z, s, scale, bias, lo, hi, out);
}

// The fused quantization's parameters (int_conv_kernels.h, FixedMagic), broadcast once per run: X's
// in the depthwise kernels that quantize float X (int_conv_fused.h), Y's in the output step below.
template <class T>
struct FusedQuantizeConsts {
  typename T::F inverse, magic, lo, hi;  // the multiply-add and its clamp
  typename T::F scale, div_lo, div_hi;   // the division's
  typename T::I z;
  uint8_t z_byte;
  bool divide;  // no inverse: every block by division
  explicit FusedQuantizeConsts(const DepthwiseFused& d)
      : inverse(T::SetF(d.inverse)),
        magic(T::SetF(FixedMagic(d.z))),
        lo(T::SetF(FixedMagic(d.z) + d.lo)),
        hi(T::SetF(FixedMagic(d.z) + d.hi)),
        scale(T::SetF(d.scale)),
        div_lo(T::SetF(d.lo)),
        div_hi(T::SetF(d.hi)),
        z(T::Set32(d.z)),
        z_byte(static_cast<uint8_t>(d.z)),
        divide(d.inverse == 0.0f) {}
  // Each lane its own parameters (IntConv's per-pixel steps: QuantizePixelsKernel, int_conv_fused.h), the same
  // float32 operations as above lane by lane (FixedMagic(z) + lo); divide: some lane has no inverse. (z_byte unused.)
  FusedQuantizeConsts(typename T::F step, typename T::F step_inverse, typename T::F step_lo, typename T::F step_hi,
                      typename T::I zero_point, bool any_divide)
      : inverse(step_inverse),
        magic(T::Add(T::SetF(kFixedBias), T::ToFloat(zero_point))),
        lo(T::Add(magic, step_lo)),
        hi(T::Add(magic, step_hi)),
        scale(step),
        div_lo(step_lo),
        div_hi(step_hi),
        z(zero_point),
        z_byte(0),
        divide(any_divide) {}
};

// 4 vectors of values quantized (int_conv_kernels.h, FixedMagic) into T::kBytes bytes, in order:
// the multiply-add gives each value's fixed-point u; where any u is a tie (its low 12 bits 0:
// T::AnyFixedTie), the whole block takes QuantizeOne's exact steps instead (divide, clamp: NaN ->
// lo, round half to even; the value placed at bit 12 like u's): QuantizeFixedU. T::PackFixedBytes gathers bits
// 12..19 of each lane.
template <class T>
[[gnu::always_inline]] inline void QuantizeFixedU(const FusedQuantizeConsts<T>& c, const typename T::F x[4],
                                                  typename T::I u[4]) {
  bool ties = true;
  if (!c.divide) {
    for (int k = 0; k < 4; ++k) u[k] = T::AsInt(T::Min(T::Max(T::MulAdd(x[k], c.inverse, c.magic), c.lo), c.hi));
    ties = T::AnyFixedTie(u);
  }
  if (ties) {
    for (int k = 0; k < 4; ++k) {
      const typename T::F t = T::Min(T::Max(T::Div(x[k], c.scale), c.div_lo), c.div_hi);
      u[k] = T::ShiftLeft32(T::Add32(T::RoundToInt(t), c.z), 12);
    }
  }
}

template <class T>
[[gnu::always_inline]] inline typename T::I QuantizeFixed(const FusedQuantizeConsts<T>& c, const typename T::F x[4]) {
  typename T::I u[4];
  QuantizeFixedU<T>(c, x, u);
  return T::PackFixedBytes(u);
}

// OutputKernel's constants, broadcast once per run.
// Y's quantization is QuantizeOne's (a division), computed as the depthwise kernels quantize X:
// QuantizeFixed, a multiply-add on a fixed-point grid, dividing only blocks near a tie.
inline DepthwiseFused OutputQuantization(const Output& o) { return FixedQuantization(o.y_params); }

template <class T>
struct OutputConsts {
  typename T::F r_scale, clip_lo, clip_hi;
  typename T::F alpha, beta, zero, one;  // the hard swish's
  typename T::F post_scale, post_bias;   // the affine map's, of one channel (Channel) or per lane (FinishTBytes)
  bool clip;  // not the default bounds (-inf, +inf), which change no bits: the clip is left out
  bool hardswish;
  bool affine;  // Output::post_scale given
  typename T::I r_zero_point;
  FusedQuantizeConsts<T> y;
  explicit OutputConsts(const Output& o)
      : r_scale(T::SetF(o.r_scale)),
        clip_lo(T::SetF(o.clip_lo)),
        clip_hi(T::SetF(o.clip_hi)),
        alpha(T::SetF(o.hardswish_alpha)),
        beta(T::SetF(o.hardswish_beta)),
        zero(T::SetF(0.0f)),
        one(T::SetF(1.0f)),
        post_scale(T::SetF(1.0f)),
        post_bias(T::SetF(0.0f)),
        clip(o.clip_lo != -INFINITY || o.clip_hi != INFINITY),
        hardswish(o.hardswish),
        affine(o.post_scale != nullptr),
        r_zero_point(T::Set32(o.r_zero_point)),
        y(OutputQuantization(o)) {}
  // The affine map of the channel of Y's element `at` (Output::post_scale given).
  void Channel(const Output& o, int64_t at) {
    const int64_t m = at / o.pixels % o.channels;
    post_scale = T::SetF(o.post_scale[m]);
    post_bias = T::SetF(o.post_bias[m]);
  }
};

// The output step's clip, hard swish and affine map of 4 vectors of y (R added already), in place.
template <class T>
[[gnu::always_inline]] inline void OutputClip(const OutputConsts<T>& c, typename T::F v[4], typename T::F post_scale,
                                              typename T::F post_bias) {
  if (c.clip) {
    for (int k = 0; k < 4; ++k) v[k] = T::Clip(v[k], c.clip_lo, c.clip_hi);
  }
  if (c.hardswish) {  // HardSwish (int_conv_kernels.h): a multiply, an add (no fused multiply-add), the clip, a multiply
    for (int k = 0; k < 4; ++k) v[k] = T::Mul(v[k], T::Clip(T::Add(T::Mul(v[k], c.alpha), c.beta), c.zero, c.one));
  }
  if (c.affine) {  // a multiply, then an add (no fused multiply-add)
    for (int k = 0; k < 4; ++k) v[k] = T::Add(T::Mul(v[k], post_scale), post_bias);
  }
}
template <class T>
[[gnu::always_inline]] inline void OutputClip(const OutputConsts<T>& c, typename T::F v[4]) {
  OutputClip<T>(c, v, c.post_scale, c.post_bias);
}

// (The helpers of the output step are always inlined: where GCC kept QuantizeFixed out of line, AVX2's
// vectors went through memory at every call, 18% of a depthwise layer's time.)
// OutputOne over 4 vectors (4 * T::kFloats elements) of y in registers: R's from r / r8, Y's to out / out8
// (each at its element 0). kTail: only the first `left` elements are there (a run's last block): float R
// is read with masked loads (the lanes past `left` are 0), Y's written up to `left`, and uint8 R comes
// padded to a whole block by the caller.
template <class T, bool kR, bool kR8, bool kQuantize, bool kTail = false>
[[gnu::always_inline]] inline void OutputValues(const OutputConsts<T>& c, typename T::F v[4], const float* r, const uint8_t* r8, float* out,
                         uint8_t* out8, int64_t left = 4 * T::kFloats) {
  using I = typename T::I;
  constexpr int R = T::kFloats;
  if (kR) {
    for (int k = 0; k < 4; ++k) v[k] = T::Add(v[k], kTail ? T::LoadFirstF(r + R * k, left - R * k) : T::LoadF(r + R * k));
  }
  if (kR8) {  // (int32)R - r_zp, to float, times r_scale: 16 bytes widened to 16 / R vectors at a time
    I w[4];
    for (int b = 0; b < 4 * R / 16; ++b) {
      T::WidenU8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r8 + 16 * b)), w + b * (16 / R));
    }
    for (int k = 0; k < 4; ++k) v[k] = T::Add(v[k], T::Mul(T::ToFloat(T::Sub32(w[k], c.r_zero_point)), c.r_scale));
  }
  OutputClip<T>(c, v);
  if (kQuantize && kTail) {
    T::StoreFirst8(out8, QuantizeFixed<T>(c.y, v), left);
  } else if (kQuantize) {
    T::Store(out8, QuantizeFixed<T>(c.y, v));
  } else if (kTail) {
    for (int k = 0; k < 4 && R * k < left; ++k) T::StoreFirstF(out + R * k, v[k], left - R * k < R ? left - R * k : R);
  } else {
    for (int k = 0; k < 4; ++k) T::StoreF(out + R * k, v[k]);
  }
}

// OutputValues of 4 vectors of y from src. kTail: y read with masked loads (the lanes past `left` are 0).
// (The tail used to go through buffers filled by memcpy, whose vector reloads stalled on store
// forwarding: 5x the product's time on a stride-2 first convolution, whose runs all end in a tail.)
template <class T, bool kR, bool kR8, bool kQuantize, bool kTail = false>
[[gnu::always_inline]] inline void OutputBlock(const OutputConsts<T>& c, const float* src, const float* r, const uint8_t* r8, float* out,
                        uint8_t* out8, int64_t left = 4 * T::kFloats) {
  constexpr int R = T::kFloats;
  typename T::F v[4];
  for (int k = 0; k < 4; ++k) v[k] = kTail ? T::LoadFirstF(src + R * k, left - R * k) : T::LoadF(src + R * k);
  OutputValues<T, kR, kR8, kQuantize, kTail>(c, v, r, r8, out, out8, left);
}

// Output (kernels.h's output): whole blocks of 4 vectors, then the last elements through buffers
// padded to a block (y and R's values read only for i < n, Y's written only for i < n).
template <class T, bool kR, bool kR8, bool kQuantize>
void OutputRun(const OutputConsts<T>& c, const Output& o, const float* y, int64_t n, int64_t at) {
  constexpr int64_t kBlock = 4 * T::kFloats;
  const float* r = kR ? o.r + at : nullptr;
  const uint8_t* r8 = kR8 ? o.r8 + at : nullptr;
  float* out = kQuantize ? nullptr : o.y + at;
  uint8_t* out8 = kQuantize ? o.y8 + at : nullptr;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    OutputBlock<T, kR, kR8, kQuantize>(c, y + i, kR ? r + i : nullptr, kR8 ? r8 + i : nullptr,
                                       kQuantize ? nullptr : out + i, kQuantize ? out8 + i : nullptr);
  }
  if (i == n) return;
  const int64_t left = n - i;
  alignas(64) uint8_t r8_tail[kBlock] = {};
  if (kR8) std::memcpy(r8_tail, r8 + i, static_cast<size_t>(left));
  OutputBlock<T, kR, kR8, kQuantize, true>(c, y + i, kR ? r + i : nullptr, r8_tail, kQuantize ? nullptr : out + i,
                                           kQuantize ? out8 + i : nullptr, left);
}

// OutputRun over `rows` runs of n floats, run r from y + r * y_stride to Y's elements from at + r * at_stride
// (channels of a tile of the depthwise kernels), the constants broadcast once; with the affine map, each
// run cut where Y's channel changes (a run of the lane kernels may hold several channels' planes).
template <class T, bool kR, bool kR8, bool kQuantize>
void OutputRows(const Output& o, const float* y, int64_t rows, int64_t n, int64_t y_stride, int64_t at,
                int64_t at_stride) {
  OutputConsts<T> c(o);
  for (int64_t r = 0; r < rows; ++r) {
    const float* run = y + r * y_stride;
    const int64_t first = at + r * at_stride;
    if (!c.affine) {
      OutputRun<T, kR, kR8, kQuantize>(c, o, run, n, first);
      continue;
    }
    for (int64_t i = 0; i < n;) {
      const int64_t end = (first + i) / o.pixels * o.pixels + o.pixels;  // the channel's end in Y
      const int64_t count = end - (first + i) < n - i ? end - (first + i) : n - i;
      c.Channel(o, first + i);
      OutputRun<T, kR, kR8, kQuantize>(c, o, run + i, count, first + i);
      i += count;
    }
  }
}

template <class T, bool kQuantize>
void OutputResidual(const Output& o, const float* y, int64_t rows, int64_t n, int64_t y_stride, int64_t at,
                    int64_t at_stride) {
  if (o.r != nullptr) {
    OutputRows<T, true, false, kQuantize>(o, y, rows, n, y_stride, at, at_stride);
  } else if (o.r8 != nullptr) {
    OutputRows<T, false, true, kQuantize>(o, y, rows, n, y_stride, at, at_stride);
  } else {
    OutputRows<T, false, false, kQuantize>(o, y, rows, n, y_stride, at, at_stride);
  }
}

template <class T>
void OutputRowsKernel(const Output& o, const float* y, int64_t rows, int64_t n, int64_t y_stride, int64_t at,
                      int64_t at_stride) {
  o.quantize ? OutputResidual<T, true>(o, y, rows, n, y_stride, at, at_stride)
             : OutputResidual<T, false>(o, y, rows, n, y_stride, at, at_stride);
}

// Output (kernels.h's output): one run.
template <class T>
void OutputKernel(const Output& o, const float* y, int64_t n, int64_t at) {
  OutputRowsKernel<T>(o, y, 1, n, n, at, 0);
}

// Finish (without the clip) of 4 vectors of C's columns from e (PostConv: and o), into v; kTail: only the
// first `left` columns are read (the lanes past them are finished from 0 and never stored). kStarted:
// the sums hold the zero-point correction already (Gemm::start).
template <class T, bool kPost, bool kBias, bool kTail = false, bool kStarted = false>
[[gnu::always_inline]] inline void PanelFinish(const int32_t* e, const int32_t* o, typename T::I z_e, typename T::I z_o, typename T::F c_e,
                        typename T::F c_o, typename T::F bias, typename T::F v[4], int64_t left = 4 * T::kFloats) {
  constexpr int R = T::kFloats;
  for (int k = 0; k < 4; ++k) {
    const typename T::I acc_e = kTail ? T::LoadFirst32(e + R * k, left - R * k) : T::Load(e + R * k);
    const typename T::I acc_o = !kPost ? T::Zero() : kTail ? T::LoadFirst32(o + R * k, left - R * k) : T::Load(o + R * k);
    v[k] = kStarted ? FinishLanes<T>(kPost, kBias, acc_e, acc_o, c_e, c_o, bias, bias, bias, false)
                    : FinishLanes<T>(kPost, kBias, T::Sub32(acc_e, z_e), T::Sub32(acc_o, z_o), c_e, c_o, bias, bias, bias, false);
  }
}

// PanelOutput (int_conv_kernels.h) for one form of the epilogue: per output channel its constants
// broadcast, per run blocks of 4 vectors of C finished (FinishLanes without the clip) into
// OutputValues, a run's last block with masked loads of C and OutputValues' tail. kStarted: C's sums
// started at -z_x * row_sum (PanelOutput::started), no subtraction.
template <class T, bool kPost, bool kBias, bool kR, bool kR8, bool kQuantize, bool kStarted = false>
void PanelOutputRuns(const PanelOutput& p) {
  using I = typename T::I;
  using F = typename T::F;
  constexpr int R = T::kFloats;
  constexpr int64_t kBlock = 4 * R;
  const Output& o = *p.output;
  OutputConsts<T> c(o);
  for (int64_t i = 0; i < p.channels; ++i) {
    const int64_t row = kPost ? 2 * i : i;
    if (c.affine && p.run_count > 0) c.Channel(o, p.runs[0].at + i * p.stride);
    const I z_e = T::Set32(p.z * p.row_sum[row]), z_o = T::Set32(kPost ? p.z * p.row_sum[row + 1] : 0);
    const F c_e = T::SetF(p.c_e[i]), c_o = T::SetF(kPost ? p.c_o[i] : 0.0f), bias = T::SetF(kBias ? p.bias[i] : 0.0f);
    for (int64_t j = 0; j < p.run_count; ++j) {
      const PanelRun& run = p.runs[j];
      const int32_t* e = p.c + row * kPanel + run.column;
      const int32_t* od = e + kPanel;
      const int64_t at = run.at + i * p.stride;
      const float* r = kR ? o.r + at : nullptr;
      const uint8_t* r8 = kR8 ? o.r8 + at : nullptr;
      float* out = kQuantize ? nullptr : o.y + at;
      uint8_t* out8 = kQuantize ? o.y8 + at : nullptr;
      int64_t x = 0;
      for (; x + kBlock <= run.count; x += kBlock) {
        F v[4];
        PanelFinish<T, kPost, kBias, false, kStarted>(e + x, od + x, z_e, z_o, c_e, c_o, bias, v);
        OutputValues<T, kR, kR8, kQuantize>(c, v, kR ? r + x : nullptr, kR8 ? r8 + x : nullptr,
                                            kQuantize ? nullptr : out + x, kQuantize ? out8 + x : nullptr);
      }
      if (x == run.count) continue;
      const int64_t left = run.count - x;
      alignas(64) uint8_t r8_tail[kBlock] = {};
      if (kR8) std::memcpy(r8_tail, r8 + x, static_cast<size_t>(left));
      F v[4];
      PanelFinish<T, kPost, kBias, true, kStarted>(e + x, od + x, z_e, z_o, c_e, c_o, bias, v, left);
      OutputValues<T, kR, kR8, kQuantize, true>(c, v, kR ? r + x : nullptr, r8_tail, kQuantize ? nullptr : out + x,
                                                kQuantize ? out8 + x : nullptr, left);
    }
  }
}

template <class T, bool kPost, bool kBias, bool kStarted>
void PanelOutputStarted(const PanelOutput& p) {
  const Output& o = *p.output;
  if (o.quantize) {
    if (o.r != nullptr) return PanelOutputRuns<T, kPost, kBias, true, false, true, kStarted>(p);
    if (o.r8 != nullptr) return PanelOutputRuns<T, kPost, kBias, false, true, true, kStarted>(p);
    return PanelOutputRuns<T, kPost, kBias, false, false, true, kStarted>(p);
  }
  if (o.r != nullptr) return PanelOutputRuns<T, kPost, kBias, true, false, false, kStarted>(p);
  if (o.r8 != nullptr) return PanelOutputRuns<T, kPost, kBias, false, true, false, kStarted>(p);
  PanelOutputRuns<T, kPost, kBias, false, false, false, kStarted>(p);
}

template <class T, bool kPost, bool kBias>
void PanelOutputForm(const PanelOutput& p) {
  if constexpr (!T::kInt16Sums) {  // (only int32 sums start at the correction: Gemm::start)
    if (p.started) return PanelOutputStarted<T, kPost, kBias, true>(p);
  }
  PanelOutputStarted<T, kPost, kBias, false>(p);
}

template <class T>
void PanelOutputKernel(const PanelOutput& p) {
  if (p.post) {
    p.bias != nullptr ? PanelOutputForm<T, true, true>(p) : PanelOutputForm<T, true, false>(p);
  } else {
    p.bias != nullptr ? PanelOutputForm<T, false, true>(p) : PanelOutputForm<T, false, false>(p);
  }
}

// FinishT with an Output (int_conv_kernels.h): a block of channels' floats, kChunk pixels at a time,
// in a tile in L1, then each channel's run of them through OutputRun into Y.
template <class T, bool kPost, bool kBias, bool kR, bool kR8, bool kQuantize>
void FinishTOutput(const FinishT& f, const OutputConsts<T>& c, int64_t b) {
  constexpr int R = T::kFloats;
  constexpr int64_t kChunk = 128;  // pixels, a multiple of R
  alignas(64) float tile[R * kChunk];
  auto put = [&](int64_t p0, int64_t count, const typename T::F* y, int64_t channels) {
    const int64_t x = p0 % kChunk;
    for (int64_t j = 0; j < channels; ++j) T::StoreF(tile + j * kChunk + x, y[j]);
    if (x + R < kChunk && p0 + count < f.pixels) return;
    const int64_t first = p0 - x, n = p0 + count - first;
    OutputConsts<T> channel = c;
    for (int64_t j = 0; j < channels; ++j) {
      const int64_t at = f.at + (R * b + j) * f.stride + first;
      if (channel.affine) channel.Channel(*f.output, at);
      OutputRun<T, kR, kR8, kQuantize>(channel, *f.output, tile + j * kChunk, n, at);
    }
  };
  FinishTBlock<T, kPost, kBias>(f, b, put);
}

// FinishT into uint8 Y (an Output that quantizes, with no R or a uint8 one) for channels [R b, R b + R),
// the channels kept in the lanes, 16 pixels at a time: each pixel's vector (FinishTRows), plus R's
// values, clipped, the hard swish, quantized 4 pixels at a time (QuantizeFixedU), whose bytes
// T::FixedDwords leaves as dword i = channel i's 4 pixels; 4 x 4 dword transposes (T::TransposeDwords4)
// then make 128-bit lanes of 16 pixels of one channel, stored as they are (uint8 R comes the other way).
// Lane by lane OutputRun's operations in its order, so the same bytes; but no floats are transposed,
// stored and reloaded (a 1x1 64->384 at 7x7 spent as long in FinishTOutput and OutputRun as in its
// product). A panel's last pixels (fewer than 16) are finished only as far as their groups of 4 reach
// and stored as the lanes' first bytes (T::StoreLanesFirst; uint8 R read through buffers): a 7x7 panel
// is 3 whole groups of 16 and one pixel, where finishing the 16 that end it again cost a quarter more.
// FinishTBytes' constants for channels [R b, R b + R) (built once per block of channels; the output
// step's shared, not copied: a copy per block was 0.5 % of MobileNetV2's int model).
template <class T, bool kPost, bool kBias>
struct FinishTBytesBlock {
  static constexpr int R = T::kFloats;
  FinishTRows<T, kPost, kBias> rows;
  const OutputConsts<T>& c;
  typename T::F post_scale, post_bias;  // the affine map per lane: channel R b + j's (0 past the block's)
  int64_t at;  // channel R b's first pixel in Y (and R)
  FinishTBytesBlock(const FinishT& f, const OutputConsts<T>& block_consts, int64_t b)
      : rows(f, b), c(block_consts), post_scale(c.post_scale), post_bias(c.post_bias), at(f.at + R * b * f.stride) {
    const Output& o = *f.output;
    if (c.affine) {
      const int64_t m = at / o.pixels % o.channels;
      post_scale = T::LoadFirstF(o.post_scale + m, rows.channels);
      post_bias = T::LoadFirstF(o.post_bias + m, rows.channels);
    }
  }
};

// FinishTBytes' steps for pixels [first, first + count) of a block of channels (count <= 16), in three
// parts: R's bytes, each quad of pixels quantized, the quads transposed and stored.
// R's values: r8[k] dword j = channel R b + j's bytes of pixels first + 4k ..
template <class T, bool kPost, bool kBias>
[[gnu::always_inline]] inline void FinishTBytesR8(const FinishT& f, const FinishTBytesBlock<T, kPost, kBias>& block,
                                                  int64_t first, int64_t count, typename T::I r8[4]) {
  constexpr int R = T::kFloats, kLanes128 = R / 4;
  const Output& o = *f.output;
  const int64_t channels = block.rows.channels, at = block.at;
  alignas(16) uint8_t r_part[R][16];  // (channels past the block's, and R's last pixels)
  const bool whole = count == 16;
  for (int j = 0; j < R; ++j) {
    if (j < channels && !whole) std::memcpy(r_part[j], o.r8 + at + j * f.stride + first, static_cast<size_t>(count));
    if (j >= channels) std::memset(r_part[j], 0, 16);
  }
  for (int j = 0; j < 4; ++j) {
    const uint8_t* lanes[kLanes128];
    for (int l = 0; l < kLanes128; ++l) {
      const int row = 4 * l + j;
      lanes[l] = row < channels && whole ? o.r8 + at + row * f.stride + first : r_part[row];
    }
    r8[j] = T::LoadLanes(lanes);
  }
  T::TransposeDwords4(r8);
}

// One quad of pixels: v[q] pixel 4k + q's y (unclipped), r8k (kR8) r8[k]; as FixedDwords' bytes.
template <class T, bool kPost, bool kBias, bool kR8>
[[gnu::always_inline]] inline typename T::I FinishTBytesQuad(const FinishTBytesBlock<T, kPost, kBias>& block,
                                                            typename T::F v[4], typename T::I r8k) {
  using I = typename T::I;
  const OutputConsts<T>& c = block.c;
  if constexpr (kR8) {
    for (int q = 0; q < 4; ++q) {  // byte q of each dword of r8k
      const I r = T::ShiftRight32(T::ShiftLeft32(r8k, 24 - 8 * q), 24);
      v[q] = T::Add(v[q], T::Mul(T::ToFloat(T::Sub32(r, c.r_zero_point)), c.r_scale));
    }
  }
  OutputClip<T>(c, v, block.post_scale, block.post_bias);
  I u[4];
  QuantizeFixedU<T>(c.y, v, u);
  return T::FixedDwords(u);
}

// The quads' bytes d[k] transposed and stored.
template <class T, bool kPost, bool kBias>
[[gnu::always_inline]] inline void FinishTBytesStore(const FinishT& f, const FinishTBytesBlock<T, kPost, kBias>& block,
                                                     int64_t first, int64_t count, typename T::I d[4]) {
  constexpr int R = T::kFloats, kLanes128 = R / 4;
  const Output& o = *f.output;
  alignas(16) uint8_t y_part[R][16];  // (channels past the block's)
  T::TransposeDwords4(d);  // d[j]: 128-bit lane l = channel R b + 4l + j's 16 pixels
  for (int j = 0; j < 4; ++j) {
    uint8_t* lanes[kLanes128];
    for (int l = 0; l < kLanes128; ++l) {
      const int row = 4 * l + j;
      lanes[l] = row < block.rows.channels ? o.y8 + block.at + row * f.stride + first : y_part[row];
    }
    count == 16 ? T::StoreLanes(d[j], lanes) : T::StoreLanesFirst(d[j], lanes, count);
  }
}

// FinishTBytes for pixels [first, first + count) of a block of channels (count <= 16; value(i): pixel
// first + i's vector of y, unclipped, the channels in the lanes; only called for i < count).
template <class T, bool kPost, bool kBias, bool kR8, class Value>
[[gnu::always_inline]] inline void FinishTBytesGroup(const FinishT& f, const FinishTBytesBlock<T, kPost, kBias>& block,
                                                     int64_t first, int64_t count, Value value) {
  using I = typename T::I;
  using F = typename T::F;
  I r8[4];
  if constexpr (kR8) FinishTBytesR8<T, kPost, kBias>(f, block, first, count, r8);
  I d[4];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {  // (unrolled: else d went through the stack)
    if (4 * k >= count) {  // (past the panel's last pixels: never stored)
      d[k] = T::Zero();
      continue;
    }
    F v[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) v[q] = 4 * k + q < count ? value(4 * k + q) : T::ZeroF();
    d[k] = FinishTBytesQuad<T, kPost, kBias, kR8>(block, v, kR8 ? r8[k] : T::Zero());
  }
  FinishTBytesStore<T, kPost, kBias>(f, block, first, count, d);
}

template <class T, bool kPost, bool kBias, bool kR8>
void FinishTBytes(const FinishT& f, const OutputConsts<T>& block_consts, int64_t b) {
  const FinishTBytesBlock<T, kPost, kBias> block(f, block_consts, b);
  for (int64_t first = 0; first < f.pixels; first += 16) {
    const int64_t count = f.pixels - first < 16 ? f.pixels - first : 16;
    FinishTBytesGroup<T, kPost, kBias, kR8>(f, block, first, count,
                                            [&](int i) { return block.rows.At(first + i); });
  }
}

template <class T, bool kPost, bool kBias>
void FinishTForm(const FinishT& f) {
  const int64_t blocks = (f.channels + T::kFloats - 1) / T::kFloats;
  if (f.output == nullptr) {
    for (int64_t b = 0; b < blocks; ++b) FinishTOut<T, kPost, kBias>(f, b);
    return;
  }
  const Output& o = *f.output;
  using Block = void (*)(const FinishT&, const OutputConsts<T>&, int64_t);
  Block block;
  if (o.quantize) {
    block = o.r != nullptr    ? FinishTOutput<T, kPost, kBias, true, false, true>
            : o.r8 != nullptr ? FinishTBytes<T, kPost, kBias, true>
                              : FinishTBytes<T, kPost, kBias, false>;
  } else {
    block = o.r != nullptr    ? FinishTOutput<T, kPost, kBias, true, false, false>
            : o.r8 != nullptr ? FinishTOutput<T, kPost, kBias, false, true, false>
                              : FinishTOutput<T, kPost, kBias, false, false, false>;
  }
  const OutputConsts<T> c(o);
  for (int64_t b = 0; b < blocks; ++b) block(f, c, b);
}

// FinishT.
template <class T>
void FinishTKernel(const FinishT& f) {
  if (f.post) {
    f.bias != nullptr ? FinishTForm<T, true, true>(f) : FinishTForm<T, true, false>(f);
  } else {
    f.bias != nullptr ? FinishTForm<T, false, true>(f) : FinishTForm<T, false, false>(f);
  }
}

// GemmT and FinishTBytes in one pass (IntConv, all of k at once, T::kFloats = kLanes): kBlocks (1 or
// 2) blocks of rows (channels [R b, R b + kBlocks R)) by one group of 16 pixels, in kBlocks tiles of
// kBlocks blocks by 16 / kBlocks pixels (16 sums each), each tile's sums finished from the registers
// into FinishTBytes' quads, the quads of the group then stored: C is never stored and reloaded
// (FinishTBytes took as long as GemmT's product in MobileNetV2's 1x1 layers). The sums start at -z0
// (FinishTRows::Start), so that the epilogue has no subtraction. 2 blocks load half the broadcasts per
// vpdpbusd of 1: ResNet-20's int model 4 % faster at batch 1 and 3 % at batch 8 than with 1 x 16 tiles
// only; 4 x 4 tiles (the quads of 4 blocks held until the group's end) were 1-3 % slower than 1 x 16.
template <class T, int kBlocks, bool kAdjacent, bool kBias, bool kR8>
void GemmTBytesTile(const GemmT& g, const FinishT& f, const FinishTBytesBlock<T, false, kBias>* blocks,
                    const int8_t* a, int64_t p0) {
  using I = typename T::I;
  using F = typename T::F;
  constexpr int kPixels = 16 / kBlocks, kQuads = kPixels / 4;
  I d[kBlocks][4];
#pragma GCC unroll 2
  for (int t = 0; t < kBlocks; ++t) {
    const int64_t first = p0 + t * kPixels;
    I sum[kPixels * kBlocks];  // (pixel p, block v) at p * kBlocks + v
    for (int v = 0; v < kBlocks; ++v) {
      const I start = blocks[v].rows.Start();
      for (int p = 0; p < kPixels; ++p) sum[p * kBlocks + v] = start;
    }
    GemmTSums<T, kBlocks, kPixels, kAdjacent, false>(a, g, first, 0, g.k4, sum);
#pragma GCC unroll 2
    for (int v = 0; v < kBlocks; ++v) {
      I r8[4];
      if constexpr (kR8) FinishTBytesR8<T, false, kBias>(f, blocks[v], p0, 16, r8);
#pragma GCC unroll 4
      for (int k = 0; k < kQuads; ++k) {
        F y[4];
        for (int q = 0; q < 4; ++q) y[q] = blocks[v].rows.Of(first + 4 * k + q, sum[(4 * k + q) * kBlocks + v], true);
        d[v][t * kQuads + k] = FinishTBytesQuad<T, false, kBias, kR8>(blocks[v], y, kR8 ? r8[t * kQuads + k] : T::Zero());
      }
    }
  }
  for (int v = 0; v < kBlocks; ++v) FinishTBytesStore<T, false, kBias>(f, blocks[v], p0, 16, d[v]);
}

// Whole groups of 16 pixels of kBlocks blocks from block b.
template <class T, int kBlocks, bool kBias, bool kR8>
void GemmTBytesRows(const GemmT& g, const FinishT& f, const OutputConsts<T>& c, int64_t b, int64_t whole) {
  constexpr int kPixels = 16;
  const FinishTBytesBlock<T, false, kBias> first(f, c, b);
  const FinishTBytesBlock<T, false, kBias> second(f, c, kBlocks > 1 ? b + 1 : b);
  const FinishTBytesBlock<T, false, kBias> blocks[2] = {first, second};
  const int8_t* a = g.a + b * g.k4 * kLanes * 4;
  const int64_t* offsets = g.pixel_offsets;
  for (int64_t p = 0; p < whole; p += kPixels) {
    if (offsets[p + kPixels - 1] == offsets[p] + 4 * (kPixels - 1)) {
      GemmTBytesTile<T, kBlocks, true, kBias, kR8>(g, f, blocks, a, p);
    } else {
      GemmTBytesTile<T, kBlocks, false, kBias, kR8>(g, f, blocks, a, p);
    }
  }
}

// Pairs of blocks of rows (one left over alone) by whole groups of 16 pixels; the panel's last pixels
// (fewer than 16: 1 of a 7x7 image, 4 of a 14x14 one) through C, GemmTKernel's tiles of all the blocks
// by those pixels then FinishTBytes (a tile of one block by one pixel is one chain of dependent
// vpdpbusd: it cost the fused pass all its gain at batch 1).
template <class T, bool kBias, bool kR8>
void GemmTBytes(const GemmT& g, const FinishT& f) {
  constexpr int kPixels = 16;  // FinishTBytes' group
  const int64_t whole = g.pixels / kPixels * kPixels, blocks = (f.channels + kLanes - 1) / kLanes;
  const OutputConsts<T> c(*f.output);
  if (whole > 0) {
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) GemmTBytesRows<T, 2, kBias, kR8>(g, f, c, b, whole);
    if (b < blocks) GemmTBytesRows<T, 1, kBias, kR8>(g, f, c, b, whole);
  }
  if (whole == g.pixels) return;
  GemmT rest = g;
  rest.pixel_offsets += whole;
  rest.pixels -= whole;
  GemmTKernel<T>(rest);
  FinishT f_rest = f;
  f_rest.pixels = rest.pixels;
  f_rest.at += whole;
  if (f.z_pixels != nullptr) {
    f_rest.z_pixels += whole;
    f_rest.s_pixels += whole;
  }
  for (int64_t b = 0; b < blocks; ++b) FinishTBytes<T, false, kBias, kR8>(f_rest, c, b);
}

// GemmT's product and its epilogue (kernels.h's gemm_t): in one pass where the epilogue is
// FinishTBytes of IntConv and the sums are int32 over all of k (VNNI), else GemmT into C, then FinishT.
template <class T>
void GemmTFinishKernel(const GemmT& g, const FinishT& f) {
  if constexpr (!T::kInt16Sums && T::kFloats == kLanes) {
    const Output* o = f.output;
    if (!f.post && o != nullptr && o->quantize && o->r == nullptr) {
      if (f.bias != nullptr) {
        o->r8 != nullptr ? GemmTBytes<T, true, true>(g, f) : GemmTBytes<T, true, false>(g, f);
      } else {
        o->r8 != nullptr ? GemmTBytes<T, false, true>(g, f) : GemmTBytes<T, false, false>(g, f);
      }
      return;
    }
  }
  GemmTKernel<T>(g);
  FinishTKernel<T>(f);
}

}  // namespace

}  // namespace onnxq::iconv
