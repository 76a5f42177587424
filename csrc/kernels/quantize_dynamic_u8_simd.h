// QuantizeDynamicU8's SIMD kernels, written once over an instruction set's traits T (simd_kernels.h
// lists what T provides): the reference kernels of quantize_dynamic_u8.cc lane by lane, so they give
// the same bits. Included only by the files that instantiate them with their traits
// (kernels_avx2.cc, kernels_avx512.cc); internal linkage, like everything those files compile.
#pragma once

#include <math.h>  // INFINITY

#include <cstddef>
#include <cstdint>

#include "kernels/quantize_dynamic_u8_kernels.h"

namespace onnxq::qdu8 {

namespace {

// MinMaxScalar: four accumulators each (one min and one max chain would wait on vminps' latency
// rather than its throughput), then their lanes and the last values folded in. Exact in any order:
// min and max do not round, and T::Min(v, acc) is FoldMin(v, acc) lane by lane, which skips a NaN in
// v the same way (so the accumulators never hold one).
template <class T>
void MinMax(const float* x, size_t n, float* mn, float* mx) {
  using F = typename T::F;
  constexpr size_t kLanes = T::kFloats;
  F vmin[4], vmax[4];
  for (int k = 0; k < 4; ++k) {
    vmin[k] = T::SetF(*mn);
    vmax[k] = T::SetF(*mx);
  }
  size_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    for (int k = 0; k < 4; ++k) {
      const F v = T::LoadF(x + i + kLanes * k);
      vmin[k] = T::Min(v, vmin[k]);
      vmax[k] = T::Max(v, vmax[k]);
    }
  }
  for (; i + kLanes <= n; i += kLanes) {
    const F v = T::LoadF(x + i);
    vmin[0] = T::Min(v, vmin[0]);
    vmax[0] = T::Max(v, vmax[0]);
  }
  alignas(64) float lanes_min[4][kLanes], lanes_max[4][kLanes];
  for (int k = 0; k < 4; ++k) {
    T::StoreF(lanes_min[k], vmin[k]);
    T::StoreF(lanes_max[k], vmax[k]);
  }
  for (int k = 0; k < 4; ++k) {
    for (size_t lane = 0; lane < kLanes; ++lane) {
      *mn = FoldMin(lanes_min[k][lane], *mn);
      *mx = FoldMax(lanes_max[k][lane], *mx);
    }
  }
  for (; i < n; ++i) {
    *mn = FoldMin(x[i], *mn);
    *mx = FoldMax(x[i], *mx);
  }
}

// QuantizeOne lane by lane: divide, clamp (T::Max(v, lo) takes lo for a NaN v, like QuantizeOne's
// compare), round half to even (cvtps2dq, like nearbyintf), add the zero point.
template <class T>
inline typename T::I QuantizeLanes(typename T::F x, typename T::F scale, typename T::F lo, typename T::F hi,
                                   typename T::I zero_point) {
  const typename T::F v = T::Min(T::Max(T::Div(x, scale), lo), hi);
  return T::Add32(T::RoundToInt(v), zero_point);
}

// QuantizeScalar: blocks of four vectors packed into bytes (the values are in [0, 255], so the
// narrowing is exact), then the last values a vector at a time.
template <class T>
void Quantize(const float* x, size_t n, const Params& p, uint8_t* y) {
  using F = typename T::F;
  using I = typename T::I;
  constexpr size_t kLanes = T::kFloats;
  const F scale = T::SetF(p.scale), lo = T::SetF(p.lo), hi = T::SetF(p.hi);
  const I zero_point = T::Set32(p.zero_point);
  size_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    I q[4];
    for (int k = 0; k < 4; ++k) q[k] = QuantizeLanes<T>(T::LoadF(x + i + kLanes * k), scale, lo, hi, zero_point);
    T::Store(y + i, T::PackBytes(q));
  }
  for (; i < n; i += kLanes) {
    const auto left = static_cast<int64_t>(n - i < kLanes ? n - i : kLanes);
    T::StoreBytesFirst(y + i, QuantizeLanes<T>(T::LoadFirstF(x + i, left), scale, lo, hi, zero_point), left);
  }
}

// MinMaxPixelsScalar 4 channels at a time, their rows read side by side from start to end (channel-major, as
// QuantizePixelsKernel reads them), each vector of pixels folded into the pixels' min and max in mn, mx. T::Min(v, acc)
// is FoldMin lane by lane (a NaN in v skipped); min and max do not round, so the order of the channels changes
// nothing. The last pixels (fewer than a vector) in one vector over all the channels.
template <class T>
void MinMaxPixels(const float* x, int64_t channels, int64_t pixels, float* mn, float* mx) {
  using F = typename T::F;
  constexpr int64_t R = T::kFloats;
  const int64_t whole = pixels / R * R;
  for (int64_t p = 0; p < whole; ++p) {
    mn[p] = INFINITY;
    mx[p] = -INFINITY;
  }
  for (int64_t c0 = 0; c0 < channels; c0 += 4) {
    const float* rows[4];
    for (int k = 0; k < 4; ++k) rows[k] = x + (c0 + k < channels ? c0 + k : channels - 1) * pixels;
    for (int64_t p = 0; p < whole; p += R) {
      F lo = T::LoadF(mn + p), hi = T::LoadF(mx + p);
      for (int k = 0; k < 4; ++k) {
        const F v = T::LoadF(rows[k] + p);
        lo = T::Min(v, lo);
        hi = T::Max(v, hi);
      }
      T::StoreF(mn + p, lo);
      T::StoreF(mx + p, hi);
    }
  }
  if (whole < pixels) {  // the last pixels: masked lanes (0, folded into lanes never stored), over all channels
    const int64_t n = pixels - whole;
    F lo = T::SetF(INFINITY), hi = T::SetF(-INFINITY);
    for (int64_t c = 0; c < channels; ++c) {
      const F v = T::LoadFirstF(x + c * pixels + whole, n);
      lo = T::Min(v, lo);
      hi = T::Max(v, hi);
    }
    T::StoreFirstF(mn + whole, lo, n);
    T::StoreFirstF(mx + whole, hi, n);
  }
}

}  // namespace

}  // namespace onnxq::qdu8
