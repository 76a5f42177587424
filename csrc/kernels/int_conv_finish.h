// PostConv/IntConv's float epilogue (int_conv.h; Finish in int_conv_kernels.h) over an instruction
// set's vectors, written once over its traits T (simd_kernels.h): FinishLanes, which every SIMD
// kernel finishes its sums with, and the epilogues of the matrix products, FinishT (GemmT's C, rows
// in the lanes) and FinishRun (runs of Gemm's C). Lane by lane they are the same float32 operations
// in the same order as Finish (cvtdq2ps rounds like the scalar int -> float conversion), so they
// give its bits.
#pragma once

#include <cstdint>

#include "kernels/int_conv_kernels.h"

namespace onnxq::iconv {

namespace {

// Finish lane by lane: acc_e, acc_o are the int32 sums with their zero-point corrections done
// (acc_o only read for PostConv), b the channels' biases (only read with bias). clip = false
// leaves the clip out, which is exact where lo, hi are the default bounds (-inf, +inf).
template <class T>
inline typename T::F FinishLanes(bool post, bool bias, typename T::I acc_e, typename T::I acc_o, typename T::F c_e,
                                 typename T::F c_o, typename T::F b, typename T::F lo, typename T::F hi,
                                 bool clip = true) {
  typename T::F y = T::Mul(T::ToFloat(acc_e), c_e);
  if (post) y = T::Add(y, T::Mul(T::ToFloat(acc_o), c_o));
  if (bias) y = T::Add(y, b);
  return clip ? T::Clip(y, lo, hi) : y;
}

// FinishT for channels [R b, R b + R), R = T::kFloats: the sums of a channel's rows (PostConv: its
// even and odd rows side by side in two lanes, added) in the lanes of one vector per pixel,
// transposed in registers so that each channel's R pixels are one store.
template <class T, bool kPost, bool kBias>
void FinishTBlock(const FinishT& f, int64_t b) {
  using I = typename T::I;
  using F = typename T::F;
  constexpr int R = T::kFloats;
  const int64_t channels = f.channels - R * b < R ? f.channels - R * b : R;
  const F bias = kBias ? T::LoadFirstF(f.bias + R * b, channels) : T::ZeroF();
  const F clip_lo = T::SetF(f.clip_lo), clip_hi = T::SetF(f.clip_hi);
  // The block's rows: R (IntConv) or 2R (PostConv) from r0, R to a vector, each at its place in
  // GemmT's blocks of kLanes rows (c_of); the second vector's only for PostConv and where the rows
  // are there (else they hold nothing any output needs).
  const int64_t r0 = kPost ? 2 * R * b : R * b, r1 = r0 + R;
  auto c_of = [&](int64_t row) { return f.c + (row / kLanes) * kLanes * f.pixels + row % kLanes; };
  const int32_t* c0 = c_of(r0);
  const int32_t* c1 = kPost && 2 * f.channels > r1 ? c_of(r1) : nullptr;
  const I z0 = T::Load(f.z + r0), z1 = T::Load(f.z + r1);
  const F f0 = T::LoadF(f.factor + r0), f1 = T::LoadF(f.factor + r1);
  for (int64_t p0 = 0; p0 < f.pixels; p0 += R) {
    const int64_t count = f.pixels - p0 < R ? f.pixels - p0 : R;
    F y[R];
    for (int i = 0; i < R; ++i) {
      if (i >= count) {
        y[i] = T::ZeroF();
        continue;
      }
      const int64_t at = (p0 + i) * kLanes;
      F v = T::Mul(T::ToFloat(T::Sub32(T::Load(c0 + at), z0)), f0);
      if (kPost) {  // each pair of lanes even + odd, the pairs of v then w in channel order
        const F w = T::Mul(T::ToFloat(T::Sub32(c1 != nullptr ? T::Load(c1 + at) : T::Zero(), z1)), f1);
        v = T::EvenLanes(T::Add(v, T::MoveHdup(v)), T::Add(w, T::MoveHdup(w)));
      }
      y[i] = T::Clip(kBias ? T::Add(v, bias) : v, clip_lo, clip_hi);
    }
    T::Transpose(y);
    float* out = f.out + R * b * f.stride + p0;
    if (count == R) {
      for (int64_t j = 0; j < channels; ++j) T::StoreF(out + j * f.stride, y[j]);
    } else {
      for (int64_t j = 0; j < channels; ++j) T::MaskStoreF(out + j * f.stride, y[j], count);
    }
  }
}

template <class T>
void FinishTKernel(const FinishT& f) {
  for (int64_t b = 0; b * T::kFloats < f.channels; ++b) {
    if (f.post) {
      f.bias != nullptr ? FinishTBlock<T, true, true>(f, b) : FinishTBlock<T, true, false>(f, b);
    } else {
      f.bias != nullptr ? FinishTBlock<T, false, true>(f, b) : FinishTBlock<T, false, false>(f, b);
    }
  }
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

}  // namespace

}  // namespace onnxq::iconv
