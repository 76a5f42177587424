// PostConv/IntConv's depthwise kernels over X quantized (int_conv_kernels.h: Depthwise, 16 pixels of
// one channel at a time, and DepthwiseLanes, 16 channels of one pixel at a time), written once over
// an instruction set's traits T (simd_kernels.h). (The depthwise kernels that quantize X themselves
// are in int_conv_fused.h.)
//
// Both sum 16 values at a time: in int16 where the weights allow (sum |w| <= kInt16WeightBudget),
// 16 lanes of one 256-bit vector under either instruction set (AVX2 instructions, which the AVX-512
// CPUs run too: the helpers below), else in int32; then T's vectors of int32 (2 of AVX2, 1 of
// AVX-512) are finished.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "kernels/int_conv_finish.h"
#include "kernels/int_conv_kernels.h"

namespace onnxq::iconv {

namespace {

// acc + the 16 bytes at p (unsigned) times w, lane by lane in int16 (exact within the budget).
inline __m256i AddBytesTimes16(__m256i acc, const uint8_t* p, __m256i w) {
  const __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_add_epi16(acc, _mm256_mullo_epi16(x, w));
}

// n < 16 floats from src to dst with plain (overlapping) vector stores; src is readable 16 floats.
inline void CopyFloats(float* dst, const float* src, int64_t n) {
  if (n >= 8) {
    _mm256_storeu_ps(dst, _mm256_loadu_ps(src));
    _mm256_storeu_ps(dst + n - 8, _mm256_loadu_ps(src + n - 8));
  } else if (n >= 4) {
    _mm_storeu_ps(dst, _mm_loadu_ps(src));
    _mm_storeu_ps(dst + n - 4, _mm_loadu_ps(src + n - 4));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  }
}

// The int32 sums of one list of taps for the 16 matrix columns at x, in 16 / T::kFloats vectors.
template <class T, bool kNarrow>
inline void TapSums(const uint8_t* x, const int64_t* offsets, const int32_t* weights, int64_t taps,
                    typename T::I sums[16 / T::kFloats]) {
  if (kNarrow) {  // int16 products and sums, widened at the end
    __m256i acc = _mm256_setzero_si256();
    for (int64_t t = 0; t < taps; ++t) {
      acc = AddBytesTimes16(acc, x + offsets[t], _mm256_set1_epi16(static_cast<int16_t>(weights[t])));
    }
    T::WidenI16(acc, sums);
    return;
  }
  // x * w as vpmaddwd of (x, 0) and (w, 0) int16 pairs: exact for any int16 w.
  constexpr int kVectors = 16 / T::kFloats;
  for (int j = 0; j < kVectors; ++j) sums[j] = T::Zero();
  for (int64_t t = 0; t < taps; ++t) {
    const typename T::I w = T::Set32(weights[t] & 0xFFFF);
    typename T::I v[kVectors];
    T::WidenU8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + offsets[t])), v);
    for (int j = 0; j < kVectors; ++j) sums[j] = T::Add32(sums[j], T::MaddI16(v[j], w));
  }
}

// Depthwise for one kind of lists: int16 or int32 sums, PostConv's two lists or IntConv's one.
template <class T, bool kNarrow, bool kPost>
void DepthwiseLists(const Depthwise& d) {
  using I = typename T::I;
  using F = typename T::F;
  constexpr int kVectors = 16 / T::kFloats;
  const uint8_t* plane = d.plane;
  const int64_t *offsets_e = d.offsets[0], *offsets_o = d.offsets[1];
  const int32_t *weights_e = d.weights[0], *weights_o = d.weights[1];
  const int64_t taps_e = d.taps[0], taps_o = d.taps[1], cols = d.cols, ow = d.ow, span = d.span;
  const I z_e = T::Set32(d.z_e), z_o = T::Set32(d.z_o);
  const F c_e = T::SetF(d.c_e), c_o = T::SetF(d.c_o);
  const bool has_bias = d.bias != nullptr;
  const F bias = T::SetF(has_bias ? *d.bias : 0.0f);
  const F clip_lo = T::SetF(d.clip_lo), clip_hi = T::SetF(d.clip_hi);
  const bool clip = d.clip_lo != -INFINITY || d.clip_hi != INFINITY;  // (the default bounds change no bits)
  // The 16 outputs of the columns at p.
  F y[kVectors];
  auto block = [&](int64_t p) {
    I e[kVectors], o[kVectors];
    TapSums<T, kNarrow>(plane + p, offsets_e, weights_e, taps_e, e);
    if (kPost) TapSums<T, kNarrow>(plane + p, offsets_o, weights_o, taps_o, o);
    for (int j = 0; j < kVectors; ++j) {
      const I acc_o = kPost ? T::Sub32(o[j], z_o) : T::Zero();
      y[j] = FinishLanes<T>(kPost, has_bias, T::Sub32(e[j], z_e), acc_o, c_e, c_o, bias, clip_lo, clip_hi, clip);
    }
  };
  if (ow >= 16) {  // row by row, the last block of each row overlapping the one before
    for (int64_t oy = 0; oy * cols < span; ++oy) {
      float* out = d.out + oy * ow;
      for (int64_t ox = 0; ox < ow; ox += 16) {
        const int64_t x0 = ox + 16 <= ow ? ox : ow - 16;
        block(oy * cols + x0);
        for (int j = 0; j < kVectors; ++j) T::StoreF(out + x0 + T::kFloats * j, y[j]);
      }
    }
    return;
  }
  // Narrow rows: blocks of 16 matrix columns, several output rows each, whose kept columns are
  // copied run by run.
  alignas(64) float columns[32];
  int64_t oy = 0, ox = 0;  // the output pixel of column p + j
  for (int64_t p = 0; p < span; p += 16) {
    block(p);
    for (int j = 0; j < kVectors; ++j) T::StoreF(columns + T::kFloats * j, y[j]);
    for (int64_t j = 0; j < 16 && p + j < span;) {
      const int64_t limit = ox < ow ? ow : cols;  // a run of kept, else of dropped columns
      const int64_t run = limit - ox < 16 - j ? limit - ox : 16 - j;
      if (ox < ow) CopyFloats(d.out + oy * ow + ox, columns + j, run);  // (run < 16)
      j += run;
      ox += run;
      if (ox == cols) {
        ox = 0;
        ++oy;
      }
    }
  }
}

template <class T>
void DepthwiseKernel(const Depthwise& d) {
  const bool narrow = d.narrow[0] && (!d.post || d.narrow[1]);
  if (d.post) {
    narrow ? DepthwiseLists<T, true, true>(d) : DepthwiseLists<T, false, true>(d);
  } else {
    narrow ? DepthwiseLists<T, true, false>(d) : DepthwiseLists<T, false, false>(d);
  }
}

// DepthwiseLanes for PostConv or IntConv, and kTaps taps (0: d.taps; 9 unrolls 3 x 3 kernels):
// tiles of T::kFloats consecutive output pixels (the last one overlapping the one before; an image
// of fewer pixels computes and stores its own), each pixel's 16 channels in the lanes, then each
// channel's pixels transposed into one vector.
template <class T, bool kPost, int kTaps>
void LanesTaps(const DepthwiseLanes& d) {
  using I = typename T::I;
  using F = typename T::F;
  constexpr int R = T::kFloats, kVectors = 16 / R;
  const int64_t pixels = d.oh * d.ow, taps = kTaps > 0 ? kTaps : d.taps;
  const bool has_bias = d.bias != nullptr;
  const F clip_lo = T::SetF(d.clip_lo), clip_hi = T::SetF(d.clip_hi);
  const bool clip = d.clip_lo != -INFINITY || d.clip_hi != INFINITY;  // (the default bounds change no bits)
  // Per lane constants: lanes [R h, R h + R) in vector h.
  I z_e[kVectors], z_o[kVectors];
  F c_e[kVectors], c_o[kVectors], bias[kVectors];
  for (int h = 0; h < kVectors; ++h) {
    z_e[h] = T::Load(d.z_e + R * h);
    z_o[h] = kPost ? T::Load(d.z_o + R * h) : T::Zero();
    c_e[h] = T::LoadF(d.c_e + R * h);
    c_o[h] = kPost ? T::LoadF(d.c_o + R * h) : T::ZeroF();
    bias[h] = has_bias ? T::LoadF(d.bias + R * h) : T::ZeroF();
  }
  const auto* w_e = reinterpret_cast<const __m256i*>(d.w_e);
  const auto* w_o = reinterpret_cast<const __m256i*>(d.w_o);
  for (int64_t p0 = 0; p0 < pixels; p0 += R) {
    const int64_t first = pixels < R ? 0 : (p0 + R <= pixels ? p0 : pixels - R);
    const int64_t count = pixels < R ? pixels : R;
    F y[kVectors][R];  // [lanes R h .. R h + R - 1][pixel]
    for (auto& lanes : y) {
      for (auto& v : lanes) v = T::ZeroF();
    }
    int64_t oy = first / d.ow, ox = first % d.ow;
    for (int64_t i = 0; i < count; ++i) {
      const uint8_t* x = d.x + ((oy * d.sh) * d.wp + ox * d.sw) * 16;
      __m256i e = _mm256_setzero_si256(), o = _mm256_setzero_si256();
      for (int64_t t = 0; t < taps; ++t) {
        e = AddBytesTimes16(e, x + d.offsets[t], _mm256_loadu_si256(w_e + t));
        if (kPost) o = AddBytesTimes16(o, x + d.offsets[t], _mm256_loadu_si256(w_o + t));
      }
      I e32[kVectors], o32[kVectors];
      T::WidenI16(e, e32);
      if (kPost) T::WidenI16(o, o32);
      for (int h = 0; h < kVectors; ++h) {
        const I acc_o = kPost ? T::Sub32(o32[h], z_o[h]) : T::Zero();
        y[h][i] = FinishLanes<T>(kPost, has_bias, T::Sub32(e32[h], z_e[h]), acc_o, c_e[h], c_o[h], bias[h], clip_lo,
                                 clip_hi, clip);
      }
      if (++ox == d.ow) {
        ox = 0;
        ++oy;
      }
    }
    // Lane c's pixels to its output plane.
    for (int h = 0; h < kVectors; ++h) {
      T::Transpose(y[h]);
      for (int c = 0; c < R && R * h + c < d.lanes; ++c) {
        float* out = d.out + (R * h + c) * pixels + first;
        if (count == R) {
          T::StoreF(out, y[h][c]);
        } else {
          T::StoreFirstF(out, y[h][c], count);
        }
      }
    }
  }
}

template <class T>
void DepthwiseLanesKernel(const DepthwiseLanes& d) {
  if (d.post) {
    d.taps == 9 ? LanesTaps<T, true, 9>(d) : LanesTaps<T, true, 0>(d);
  } else {
    d.taps == 9 ? LanesTaps<T, false, 9>(d) : LanesTaps<T, false, 0>(d);
  }
}

}  // namespace

}  // namespace onnxq::iconv
