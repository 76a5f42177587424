// PostConv/IntConv's depthwise kernels straight from the float input (int_conv_kernels.h:
// DepthwiseFused and its quantization QuantizeFused, LanesFused), written once over an instruction
// set's traits T (simd_kernels.h): the fused quantization, the padded plane, the walk over output
// channels and blocks of matrix columns, and LanesFused whole.
//
// What sums a DepthwiseFused block's taps is T::Fused, the one part of the SIMD kernels that is a
// different algorithm on each instruction set, each made for its multiply-add: AVX2 sums only the
// nonzero pairs of adjacent taps with vpmaddubsw in int16 (a POST code is in one of its two lists,
// so this halves PostConv's work, and the int16 sums need narrow lists); AVX-512 VNNI sums every
// group of 4 taps with vpdpbusd in int32, both lists from the same loads, any int8 weights. It
// provides:
//   kBlock                         matrix columns per block (a multiple of 16)
//   kTapGroups                     whether Block reads d.groups tap groups (then instantiated for a
//                                  3 x 3 kernel's count too), or d.pairs
//   kQuantizeRows                  whether the plane is quantized row by row in place
//                                  (QuantizePlane) rather than copied from d.bytes (BuildPlane)
//   kRowColumns                    the plane's rows hold whole multiples of this many columns
//   Consts(d, i)                   output channel i's constants, in registers (a FusedFinish)
//   Block<kPost, kBias, kGroups, kStride>(d, consts, p0, out, first)
//                                  matrix columns [p0, p0 + kBlock): the sums, Finish (consts'
//                                  FusedFinish), and the outputs of the kept columns stored at
//                                  out[starts[p0 / 8] - first ...] (kGroups: d.groups, or 0 for a
//                                  count known only at run time; kStride: d.sw, 1 or 2); it may
//                                  write up to 8 floats past them, where later outputs go
#pragma once

#include <immintrin.h>
#include <math.h>  // INFINITY

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/int_conv_finish.h"
#include "kernels/int_conv_kernels.h"
#include "kernels/quantize_dynamic_u8_kernels.h"

namespace onnxq::iconv {

namespace {

// dst[i] = src[i] quantized for i < n, and z up to the next multiple of T::kBytes (lanes past n
// read as 0.0, which quantizes to z); reads no float past n.
template <class T>
void QuantizeFixedRun(const FusedQuantizeConsts<T>& c, const float* src, int64_t n, uint8_t* dst) {
  constexpr int64_t R = T::kFloats;
  typename T::F x[4];
  int64_t i = 0;
  for (; i + 4 * R <= n; i += 4 * R) {
    for (int k = 0; k < 4; ++k) x[k] = T::LoadF(src + i + R * k);
    T::Store(dst + i, QuantizeFixed<T>(c, x));
  }
  if (i < n) {
    for (int k = 0; k < 4; ++k) x[k] = T::LoadFirstF(src + i + R * k, n - i - R * k);
    T::Store(dst + i, QuantizeFixed<T>(c, x));
  }
}

// QuantizePixelsScalar (kernels.h's quantize_pixels: IntConv's per-pixel steps, int_conv.h) without a division
// per value: 4 channels at a time, their rows read side by side from start to end (channel-major: with every channel
// read for one vector of pixels at a time, a (1, 1536, 256, 1) -> 384 op took 1.09x the per-tensor op's time, now
// 1.04x; one-off script timing the op alone, VNNI, interleaved, medians), each vector
// of pixels with its steps (FusedQuantizeConsts' per-lane form) through QuantizeFixed (a multiply-add on the
// fixed-point grid, dividing only blocks near a tie, or all of them where some pixel of the image has no inverse:
// QuantizeOne's bytes), whose 4 quarters are the channels' bytes (T::StoreQuarters). The last pixels (fewer than a
// vector) read as masked lanes (0: never stored), their bytes stored as such (T::StoreQuartersFirst).
template <class T>
void QuantizePixelsKernel(const float* x, int64_t channels, int64_t pixels, const qdu8::PixelSteps& s, uint8_t* y) {
  constexpr int64_t R = T::kFloats;
  auto consts = [&](int64_t p, int64_t n) {
    return FusedQuantizeConsts<T>(T::LoadFirstF(s.scale + p, n), T::LoadFirstF(s.inverse + p, n), T::LoadFirstF(s.lo + p, n),
                                  T::LoadFirstF(s.hi + p, n), T::LoadFirst32(s.zero_point + p, n), s.divide);
  };
  for (int64_t c0 = 0; c0 < channels; c0 += 4) {
    const float* from[4];
    uint8_t* to[4];
    for (int k = 0; k < 4; ++k) {  // (past the last channel: the last one again, the same bytes to the same place)
      const int64_t channel = c0 + k < channels ? c0 + k : channels - 1;
      from[k] = x + channel * pixels;
      to[k] = y + channel * pixels;
    }
    typename T::F v[4];
    int64_t p = 0;
    for (; p + R <= pixels; p += R) {
      for (int k = 0; k < 4; ++k) v[k] = T::LoadF(from[k] + p);
      uint8_t* at[4] = {to[0] + p, to[1] + p, to[2] + p, to[3] + p};
      T::StoreQuarters(at, QuantizeFixed<T>(consts(p, R), v));
    }
    if (p < pixels) {
      const int64_t n = pixels - p;
      for (int k = 0; k < 4; ++k) v[k] = T::LoadFirstF(from[k] + p, n);
      uint8_t* at[4] = {to[0] + p, to[1] + p, to[2] + p, to[3] + p};
      T::StoreQuartersFirst(at, QuantizeFixed<T>(consts(p, n), v), n);
    }
  }
}

// QuantizeFused (kernels.h's quantize_fused): dst[i] = QuantizeOne(d.x[i]) for i < n, with d's
// parameters; writes up to T::kBytes - 1 bytes past n.
template <class T>
void QuantizeFusedKernel(const DepthwiseFused& d, int64_t n, uint8_t* dst) {
  QuantizeFixedRun<T>(FusedQuantizeConsts<T>(d), d.x, n, dst);
}

// dst[i] = src[i] quantized for i < n, then z over the T::kBytes bytes past n. `readable` floats
// from src may be read: where that covers whole vectors, the row's last vector reads on (no masked
// loads) and its bytes past n are set back to z.
template <class T>
void QuantizeFixedRow(const FusedQuantizeConsts<T>& c, const float* src, int64_t n, int64_t readable, uint8_t* dst) {
  constexpr int64_t R = T::kFloats;
  const int64_t whole = (n + 4 * R - 1) / (4 * R) * (4 * R);
  if (whole > readable) {
    QuantizeFixedRun<T>(c, src, n, dst);
  } else {
    typename T::F x[4];
    for (int64_t i = 0; i < whole; i += 4 * R) {
      for (int k = 0; k < 4; ++k) x[k] = T::LoadF(src + i + R * k);
      T::Store(dst + i, QuantizeFixed<T>(c, x));
    }
  }
  T::Store(dst + n, T::Set8(static_cast<int8_t>(c.z_byte)));
}

// Output channel i's float constants, broadcast, and Finish of its sums (int_conv_kernels.h),
// for T::Fused::Consts.
template <class T>
struct FusedFinish {
  typename T::F c_e, c_o, bias, clip_lo, clip_hi;
  bool clip;  // not the default bounds, which change no bits: the clip is left out
  FusedFinish(const DepthwiseFused& d, int64_t i)
      : c_e(T::SetF(d.c_e[i])),
        c_o(T::SetF(d.c_o[i])),
        bias(T::SetF(d.bias != nullptr ? d.bias[i] : 0.0f)),
        clip_lo(T::SetF(d.clip_lo)),
        clip_hi(T::SetF(d.clip_hi)),
        clip(d.clip_lo != -INFINITY || d.clip_hi != INFINITY) {}
  // acc_e, acc_o: the sums with their zero-point corrections done (acc_o read only for PostConv).
  template <bool kPost, bool kBias>
  typename T::F Finish(typename T::I acc_e, typename T::I acc_o) const {
    return FinishLanes<T>(kPost, kBias, acc_e, acc_o, c_e, c_o, bias, clip_lo, clip_hi, clip);
  }
};

// n bytes from src to dst, exactly (rows of the plane must keep their padding): 16-byte vectors,
// the last one ending at n.
inline void CopyRow(uint8_t* dst, const uint8_t* src, int64_t n) {
  auto copy16 = [&](int64_t i) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  };
  auto copy8 = [&](int64_t i) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + i), _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i)));
  };
  if (n >= 16) {
    for (int64_t i = 0; i + 16 < n; i += 16) copy16(i);
    copy16(n - 16);
  } else if (n >= 8) {
    copy8(0);
    copy8(n - 8);
  } else if (n >= 4) {
    uint32_t head, tail;
    std::memcpy(&head, src, 4);
    std::memcpy(&tail, src + n - 4, 4);
    std::memcpy(dst, &head, 4);
    std::memcpy(dst + n - 4, &tail, 4);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  }
}

// The padded plane: z everywhere once per scratch buffer (d.fresh; rows of X never overwrite the
// padding), then the quantized channel (d.bytes) copied row by row, each to its row phase.
inline void BuildPlane(const DepthwiseFused& d) {
  if (d.fresh) std::memset(d.plane, d.z, static_cast<size_t>(d.sh * d.hq * d.wp + kFusedSlack));
  int64_t phase = d.pt % d.sh, row = d.pt / d.sh;
  for (int64_t iy = 0; iy < d.h; ++iy) {
    CopyRow(d.plane + (phase * d.hq + row) * d.wp + d.pl, d.bytes + iy * d.w, d.w);
    if (++phase == d.sh) {
      phase = 0;
      ++row;
    }
  }
}

// The padded plane straight from X: z everywhere once per scratch buffer (d.fresh), then each row
// of X quantized into its place in whole vectors (reading on into the next row where X goes on),
// and the 32 bytes past the row set back to z. Rows go in memory order (phase by phase, each top
// to bottom), so those bytes land only on padding or on rows written later. This saves the copy of
// each row from a contiguous quantized channel (dw 144 @28: about 5 us of 80 at batch 1, against
// quantizing 32 values per row of 28).
template <class T>
void QuantizePlane(const DepthwiseFused& d) {
  if (d.fresh) std::memset(d.plane, d.z, static_cast<size_t>(d.sh * d.hq * d.wp + kFusedSlack));
  const FusedQuantizeConsts<T> consts(d);
  for (int64_t phase = 0; phase < d.sh; ++phase) {
    // Padded row y = pt + iy is in phase y % sh, row y / sh: each step of sh rows of X is one row
    // of the phase (no division per row).
    const int64_t iy0 = ((phase - d.pt) % d.sh + d.sh) % d.sh;
    uint8_t* dst = d.plane + (phase * d.hq + (d.pt + iy0) / d.sh) * d.wp + d.pl;
    for (int64_t iy = iy0; iy < d.h; iy += d.sh, dst += d.wp) {
      QuantizeFixedRow<T>(consts, d.x + iy * d.w, d.w, d.readable - iy * d.w, dst);
    }
  }
}

// Output channel i's blocks: their outputs into its plane of Y, or with an Output (the clip bounds
// then the default ones) kTileBlocks blocks' outputs (16 KiB) at a time into a tile in L1 and from it
// through the output step into Y (a 112x112 channel's floats staged whole, 49 KiB, left the L1 cache
// before the output step read them back; tiles of 16 blocks, with a run's tail each, made AVX2's
// 56x56 layers slower than staging whole).
template <class T, bool kPost, bool kBias, int kGroups, int kStride>
void FusedBlocks(const DepthwiseFused& d, int64_t i) {
  using Fused = typename T::Fused;
  constexpr int64_t kBlock = Fused::kBlock, kTileBlocks = 64;
  const typename Fused::Consts consts(d, i);
  if (d.output == nullptr) {
    float* out = d.out + i * d.pixels;
    for (int64_t p0 = 0; p0 < d.span; p0 += kBlock) {
      Fused::template Block<kPost, kBias, kGroups, kStride>(d, consts, p0, out, 0);
    }
    return;
  }
  alignas(64) float tile[kTileBlocks * kBlock + 16];  // (+ 16: what a block may write past its outputs)
  const int64_t end = (d.span + kBlock - 1) / kBlock * kBlock;
  for (int64_t p0 = 0; p0 < end; p0 += kTileBlocks * kBlock) {
    const int64_t p1 = p0 + kTileBlocks * kBlock < end ? p0 + kTileBlocks * kBlock : end;
    const int64_t first = d.starts[p0 / 8];
    for (int64_t p = p0; p < p1; p += kBlock) Fused::template Block<kPost, kBias, kGroups, kStride>(d, consts, p, tile, first);
    const int64_t count = d.starts[p1 / 8] - first;
    if (count > 0) OutputKernel<T>(*d.output, tile, count, d.at + i * d.pixels + first);
  }
}

template <class T, bool kPost, bool kBias, int kStride>
void FusedGroups(const DepthwiseFused& d, int64_t i) {
  if constexpr (!T::Fused::kTapGroups) {
    FusedBlocks<T, kPost, kBias, 0, kStride>(d, i);
  } else if (d.groups == 3) {  // 3 x 3 kernels: 3 groups of 4 taps (VNNI)
    FusedBlocks<T, kPost, kBias, 3, kStride>(d, i);
  } else {
    FusedBlocks<T, kPost, kBias, 0, kStride>(d, i);
  }
}

template <class T, bool kPost, bool kBias>
void FusedChannel(const DepthwiseFused& d, int64_t i) {
  d.sw == 2 ? FusedGroups<T, kPost, kBias, 2>(d, i) : FusedGroups<T, kPost, kBias, 1>(d, i);
}

// DepthwiseFused (kernels.h's depthwise_fused): the input channel's padded plane, then each of its
// output channels.
template <class T>
void DepthwiseFusedKernel(const DepthwiseFused& d) {
  if (T::Fused::kQuantizeRows && d.x != nullptr) {
    QuantizePlane<T>(d);
  } else {  // (uint8 X: d.x is null, d.bytes the channel as given)
    BuildPlane(d);
  }
  for (int64_t i = 0; i < d.outputs; ++i) {
    if (d.post) {
      d.bias != nullptr ? FusedChannel<T, true, true>(d, i) : FusedChannel<T, true, false>(d, i);
    } else {
      d.bias != nullptr ? FusedChannel<T, false, true>(d, i) : FusedChannel<T, false, false>(d, i);
    }
  }
}

// LanesFused (int_conv_kernels.h): 16 channels in the lanes, cells of G = T::kLaneTaps horizontally
// adjacent pixels (T::kBytes bytes: 16 channels x G bytes), whose products with a tap group's weights
// one T::AddProducts sums: AVX2 vpmaddubsw, G = 2, the channels' sums in 16 int16 lanes (every list
// narrow, so they are exact); AVX-512 VNNI vpdpbusd, G = 4, in 16 int32 lanes.

// 16 rows of T::kBytes bytes, each 128-bit lane transposed on its own (r[i] lane l byte j -> r[j]
// lane l byte i): four rounds of interleaving row i with row i + 8 are a perfect shuffle that
// transposes a 16 x 16 matrix.
template <class T>
inline void TransposeBytes16(typename T::I r[16]) {
  typename T::I t[16];
  for (int round = 0; round < 4; ++round) {
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = T::InterleaveLo8(r[i], r[i + 8]);
      t[2 * i + 1] = T::InterleaveHi8(r[i], r[i + 8]);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
  }
}

// The pixels of TransposeBytes16's rows in order (lane kLane of r[j] holds pixel 16 kLane + j),
// the first `left` of them, each to put.
template <class T, int kLane = 0, class Put>
inline void PutPixels(const typename T::I r[16], int64_t left, Put& put) {
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) {
    if (16 * kLane + j < left) put(T::template Lane128<kLane>(r[j]));
  }
  if constexpr (kLane + 1 < T::kBytes / 16) PutPixels<T, kLane + 1>(r, left, put);
}

// LanesCellsOf's cells straight from the 16 channel planes, where cells start every 2 columns (VNNI's 3-wide
// kernels, and stride 2) and a padded row's cells fit a vector (at most 16): cell c of padded row y is
// dword c / 2 of the row's even part (padded columns 0, 4, 8, ..) or odd part (2, 6, ..). Each channel's
// two parts of a padded row are masked loads into the halves of one vector
// (z where the column or row is padding, or the lane past d.lanes), and one 16 x 16 dword transpose makes
// them the cells, channel i in lane i. Spares the image of 16-byte pixels, its byte transposes and padding,
// and the pass that cut cells from it. Taken only for rows of 9 to 16 cells (images 15 to 30 wide): scratch
// A/B of MobileNetV2's int model (VNNI, 7 and 9 interleaved rounds) 2-3% faster with its 28x28 depthwise
// layers so, 1-8% slower with the 14x14 and 7x7 ones too (a transpose for their 8 or 5 cells per row, or
// two rows to a vector at 4 masked loads per channel, cost more than the byte transposes). Returns false
// where it does not apply.
template <class T>
void LanesCellsRows(const LanesFused& d, uint8_t* cells) {
  using I = typename T::I;
  const int64_t wc = LanesCells(d.wp, d.step);
  uint64_t masks[2];  // of a part's 32 bytes: those of X (padded column 2 * parity + b, X's column - pl)
  for (int parity = 0; parity < 2; ++parity) {
    const int64_t lo = std::max<int64_t>(0, d.pl - 2 * parity), hi = std::min<int64_t>(32, d.w + d.pl - 2 * parity);
    masks[parity] = hi > lo ? ((~uint64_t{0}) >> (64 - (hi - lo))) << lo : 0;
  }
  const I z = T::Set8(static_cast<int8_t>(d.z));
  const int64_t n = d.h * d.w;
  for (int64_t y = 0; y < d.hp; ++y) {
    uint8_t* row = cells + y * wc * T::kBytes;
    const int64_t yx = y - d.pt;  // X's row
    if (yx < 0 || yx >= d.h) {
      for (int64_t c = 0; c < wc; ++c) T::Store(row + c * T::kBytes, z);
      continue;
    }
    I v[16];
#pragma GCC unroll 2
    for (int parity = 0; parity < 2; ++parity) {
      // byte 32 parity + b of the vector: X's column 2 parity - pl + b (address arithmetic: p may precede X)
      const auto from = reinterpret_cast<uintptr_t>(d.bytes + yx * d.w) + static_cast<uintptr_t>(2 * parity - d.pl - 32 * parity);
      const uint64_t mask = masks[parity] << (32 * parity);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {  // (lanes past d.lanes: z, nothing read)
        const auto p = reinterpret_cast<const uint8_t*>(from + static_cast<uintptr_t>(i * n));
        v[i] = T::MaskLoadBytes(parity == 0 ? z : v[i], i < d.lanes ? mask : 0, p);
      }
    }
    T::TransposeDwords16(v);  // v[k]: dword k of every channel's vector, channel i in lane i
#pragma GCC unroll 16
    for (int k = 0; k < 16; ++k) {
      const int64_t c = k < 8 ? 2 * k : 2 * (k - 8) + 1;  // (the even part's cells, then the odd part's)
      if (c < wc) T::Store(row + c * T::kBytes, v[k]);
    }
  }
}

template <class T>
inline bool LanesCellsDirect(const LanesFused& d, uint8_t* cells) {
  const int64_t wc = LanesCells(d.wp, d.step);
  if constexpr (T::kLaneTaps != 4) {
    return false;
  } else {
    if (d.step != 2 || wc > 16 || wc <= 8) return false;  // (see above)
    LanesCellsRows<T>(d, cells);
    return true;
  }
}

// The padded image of 16-byte pixels (d.scratch), then its cells (after it); or the cells alone
// (LanesCellsDirect).
template <class T>
inline uint8_t* LanesCellsOf(const LanesFused& d) {
  const int64_t wt = d.wp + 4, wc = LanesCells(d.wp, d.step);
  uint8_t* img = d.scratch;
  uint8_t* cells = d.scratch + d.hp * wt * 16;
  if (LanesCellsDirect<T>(d, cells)) return cells;
  // z where X does not land (the rows above and below it, the columns left and right of it): the
  // whole image at every block cost about as much as all the stores of X into it.
  const auto row_bytes = static_cast<size_t>(wt * 16);
  std::memset(img, d.z, static_cast<size_t>(d.pt) * row_bytes);
  std::memset(img + (d.pt + d.h) * wt * 16, d.z, static_cast<size_t>(d.hp - d.pt - d.h) * row_bytes);
  for (int64_t y = d.pt; y < d.pt + d.h; ++y) {
    std::memset(img + y * wt * 16, d.z, static_cast<size_t>(d.pl * 16));
    std::memset(img + (y * wt + d.pl + d.w) * 16, d.z, static_cast<size_t>((wt - d.pl - d.w) * 16));
  }
  const int64_t n = d.h * d.w, w = d.w;
  const typename T::I z = T::Set8(static_cast<int8_t>(d.z));
  int64_t ix = 0;
  uint8_t* row = img + (d.pt * wt + d.pl) * 16;
  // The next pixel's 16 bytes to its place in the padded image.
  auto put = [&](__m128i pixel) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(row + ix * 16), pixel);
    if (++ix == w) {
      ix = 0;
      row += wt * 16;
    }
  };
  // T::kBytes pixels of the 16 planes at a time.
  for (int64_t q0 = 0; q0 < n; q0 += T::kBytes) {
    typename T::I r[16];
    for (int i = 0; i < 16; ++i) r[i] = i < d.lanes ? T::Load(d.bytes + i * n + q0) : z;
    TransposeBytes16<T>(r);
    PutPixels<T>(r, n - q0, put);
  }
  // Cell (y, c) from the G pixels at step * c.
  const int64_t step = 16 * d.step, hp = d.hp;
  for (int64_t y = 0; y < hp; ++y) {
    const uint8_t* src = img + y * wt * 16;
    uint8_t* dst = cells + y * wc * T::kBytes;
    for (int64_t c = 0; c < wc; ++c, src += step, dst += T::kBytes) T::Store(dst, T::LaneCell(src));
  }
  return cells;
}

// LanesPixels' tile of 16 pixels (AVX-512: y[i] pixel i's 16 channels, unclipped) through the output
// step into uint8 Y, as FinishTBytes does for GemmT's tiles: OutputClip and QuantizeFixedU on 4 pixels
// at a time, the bytes transposed (TransposeDwords4) so that each channel's 16 pixels are one store, at
// out + i * stride for lane i < lanes. Lane by lane the same steps as OutputOne, so the same bytes; it
// spares OutputKernel's pass over staged floats and their transposes (bench_integer's MobileNetV2: its
// depthwise layers are uint8 to uint8).
template <class T>
[[gnu::always_inline]] inline void LanesTileBytes(const OutputConsts<T>& c, const typename T::F y[16], uint8_t* out,
                                                  int64_t stride, int64_t lanes) {
  using I = typename T::I;
  using F = typename T::F;
  I d[4];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    F v[4] = {y[4 * k], y[4 * k + 1], y[4 * k + 2], y[4 * k + 3]};
    OutputClip<T>(c, v);
    I u[4];
    QuantizeFixedU<T>(c.y, v, u);
    d[k] = T::FixedDwords(u);
  }
  T::TransposeDwords4(d);  // d[j]: 128-bit lane l = lane 4l + j's 16 pixels
  alignas(16) uint8_t spare[4][16];  // (lanes past the block's)
  for (int j = 0; j < 4; ++j) {
    uint8_t* rows[4];
    for (int l = 0; l < 4; ++l) rows[l] = 4 * l + j < lanes ? out + (4 * l + j) * stride : spare[l];
    T::StoreLanes(d[j], rows);
  }
}

// The sums and Finish lane by lane, T::kFloats output pixels at a time, transposed so that each
// channel's pixels are one store; then the last pixels one at a time, scattered to the channels'
// planes. kGroups: d.groups, or 0 for a count known only at run time (then its cells and weights
// are loaded group by group). kPaired: cells every second column at stride 1 (LanesStep), so that
// two outputs (ox even, ox + 1) share their cells' loads, the odd one from the cells shifted down a
// byte (the weights of taps 0..2 meet pixels 1..3).
template <class T, int kGroups, bool kPost, bool kBias, bool kPaired>
void LanesPixels(const LanesFused& d, const uint8_t* cells) {
  using I = typename T::I;
  using F = typename T::F;
  constexpr int R = T::kFloats, kVectors = 16 / R;  // channels R h .. R h + R - 1 in vector h
  constexpr int kHeld = kGroups > 0 ? kGroups : 1;
  const int64_t groups = kGroups > 0 ? kGroups : d.groups;
  const int64_t wc = LanesCells(d.wp, d.step);
  const auto* weights = static_cast<const uint8_t*>(d.weights);  // [2][groups] of T::kBytes
  I we[kHeld], wo[kHeld];
  int64_t off[kHeld];
  if (kGroups > 0) {
    for (int t = 0; t < kHeld; ++t) {
      we[t] = T::Load(weights + t * T::kBytes);
      wo[t] = T::Load(weights + (groups + t) * T::kBytes);
      off[t] = d.offsets[t] * T::kBytes;
    }
  }
  // The sums start at -z_x * sum w: the zero-point correction, done.
  const I ze = T::LaneSumsFrom(d.z_e), zo = T::LaneSumsFrom(d.z_o);
  F ce[kVectors], co[kVectors], bias[kVectors];
  for (int h = 0; h < kVectors; ++h) {
    ce[h] = T::LoadF(d.c_e + R * h);
    co[h] = T::LoadF(d.c_o + R * h);
    bias[h] = kBias ? T::LoadF(d.bias + R * h) : T::ZeroF();
  }
  const F clip_lo = T::SetF(d.clip_lo), clip_hi = T::SetF(d.clip_hi);
  // The default bounds (every kernel's with an Output, which clips after R) change no bits: no clip then (it was 2
  // of the 5 float operations per vector of MobileNetV2's uint8 depthwise layers).
  const bool clip = d.clip_lo != -INFINITY || d.clip_hi != INFINITY;
  const int64_t pixels = d.oh * d.ow, ow = d.ow, lanes = d.lanes, row_step = d.sh * wc * T::kBytes;
  // The outputs: lane i's pixel p at out[i * stride + p - base], in its plane of Y (d.out), or with an
  // Output on the stack, which flush takes through the output step into Y: the lanes' planes whole
  // where they fit (then one run of Y), else chunks of kChunk pixels of each (a 56x56 block's 16 planes
  // staged whole, 196 KiB, left the cache before the output step read them).
  constexpr int64_t kChunk = 256;  // pixels, a multiple of R
  alignas(64) float chunk[16 * kChunk];
  // AVX-512 into uint8 Y with no residual (a uint8 chain's depthwise layers), images of 128 pixels or
  // more: whole tiles go through the output step in registers, channels in the lanes, straight into Y's
  // bytes (LanesTileBytes), and the last 16 pixels as one more tile over the ones before. Per node
  // (onnxruntime's profiler, one thread, batch 8, old and new sessions interleaved in one process, three
  // runs): MobileNetV2's dw 32 @28x28 96-98 -> 84-89 us, dw 144 @14x14 97-99 -> 91; at 7x7 (4 tiles for
  // 49 pixels) nothing measurable (48 -> 50 us), so smaller images keep the staged floats.
  const bool direct = R == 16 && pixels >= 8 * R && d.output != nullptr && d.output->quantize && d.output->r == nullptr &&
                      d.output->r8 == nullptr;
  const Output none{};
  OutputConsts<T> oc(direct ? *d.output : none);
  if (direct && oc.affine) {  // lane i's map is channel (at / pixels) % channels + i's
    const int64_t m = d.at / d.output->pixels % d.output->channels;
    oc.post_scale = T::LoadFirstF(d.output->post_scale + m, d.lanes);
    oc.post_bias = T::LoadFirstF(d.output->post_bias + m, d.lanes);
  }
  const bool staged = d.output != nullptr, whole = !direct && pixels <= kChunk;
  float* const out = staged ? chunk : d.out;
  const int64_t stride = staged && !whole ? kChunk : pixels;
  int64_t base = 0;
  auto flush = [&](int64_t end) {  // (staged) pixels [base, end) of every lane
    if (whole) {
      OutputKernel<T>(*d.output, chunk, lanes * pixels, d.at);
    } else if (end > base) {
      OutputRowsKernel<T>(*d.output, chunk, lanes, end - base, kChunk, d.at + base, pixels);
    }
    base = end;
  };
  int64_t ox = 0;  // the next output pixel: column ox of the output row whose cells start at `row`
  const uint8_t* row = cells;
  auto advance = [&]() {
    if (++ox == ow) {
      ox = 0;
      row += row_step;
    }
  };
  // Outputs go to a tile, pixel i's channels R h .. R h + R - 1 at tile[h][i].
  using Tile = F[kVectors][R];
  // One output's 16 channels finished from its sums, to tile[.][i].
  auto finish_sums = [&](I acc_e, I acc_o, Tile& tile, int i) {
    I e32[kVectors], o32[kVectors];
    T::LaneInt32(acc_e, e32);
    T::LaneInt32(acc_o, o32);
    for (int h = 0; h < kVectors; ++h) {
      tile[h][i] = FinishLanes<T>(kPost, kBias, e32[h], o32[h], ce[h], co[h], bias[h], clip_lo, clip_hi, clip);
    }
  };
  // One output from its held cells v (the odd output of a pair: shifted down a byte).
  auto finish = [&](const I v[kHeld], bool odd, Tile& tile, int i) {
    I acc_e = ze, acc_o = zo;
    for (int t = 0; t < kHeld; ++t) {
      I x = v[t];
      if constexpr (kPaired) x = odd ? T::ShiftCellsByte(x) : x;
      acc_e = T::AddProducts(acc_e, x, we[t]);
      if (kPost) acc_o = T::AddProducts(acc_o, x, wo[t]);
    }
    finish_sums(acc_e, acc_o, tile, i);
  };
  auto load = [&](I v[kHeld]) {
    const uint8_t* base = row + (kPaired ? ox >> 1 : ox) * T::kBytes;
    for (int t = 0; t < kHeld; ++t) v[t] = T::Load(base + off[t]);
  };
  // The next output alone.
  auto pixel = [&](Tile& tile, int i) {
    if (kGroups == 0) {
      const uint8_t* base = row + (kPaired ? ox >> 1 : ox) * T::kBytes;
      const bool odd = kPaired && (ox & 1) != 0;
      advance();
      I acc_e = ze, acc_o = zo;
      for (int64_t t = 0; t < groups; ++t) {
        I x = T::Load(base + d.offsets[t] * T::kBytes);
        if constexpr (kPaired) x = odd ? T::ShiftCellsByte(x) : x;
        acc_e = T::AddProducts(acc_e, x, T::Load(weights + t * T::kBytes));
        if (kPost) acc_o = T::AddProducts(acc_o, x, T::Load(weights + (groups + t) * T::kBytes));
      }
      return finish_sums(acc_e, acc_o, tile, i);
    }
    I v[kHeld];
    load(v);
    const bool odd = kPaired && (ox & 1) != 0;
    advance();
    finish(v, odd, tile, i);
  };
  // The next two outputs: one load of cells where they are a pair (ox even, ox + 1 in the row).
  auto two = [&](Tile& tile, int i) {
    if (!kPaired || kGroups == 0 || (ox & 1) != 0 || ox + 1 == ow) {
      pixel(tile, i);
      pixel(tile, i + 1);
      return;
    }
    I v[kHeld];
    load(v);
    ox += 2;  // (ox + 1 < ow: the row continues past the pair, or ends with it)
    if (ox == ow) {
      ox = 0;
      row += row_step;
    }
    finish(v, false, tile, i);
    finish(v, true, tile, i + 1);
  };
  int64_t p0 = 0;
  // Whole tiles of R pixels: transposed, one store per channel.
  for (; p0 + R <= pixels; p0 += R) {
    Tile tile;
#pragma GCC unroll 8
    for (int i = 0; i < R; i += 2) two(tile, i);
    if constexpr (R == 16) {
      if (direct) {
        LanesTileBytes<T>(oc, tile[0], d.output->y8 + d.at + p0, pixels, lanes);
        base = p0 + R;  // (nothing staged)
        continue;
      }
    }
    for (int h = 0; h < kVectors; ++h) {
      T::Transpose(tile[h]);
      if (lanes == 16) {
#pragma GCC unroll 16
        for (int j = 0; j < R; ++j) T::StoreF(out + (R * h + j) * stride + (p0 - base), tile[h][j]);
      } else {
        for (int64_t j = 0; j < R && R * h + j < lanes; ++j) {
          T::StoreF(out + (R * h + j) * stride + (p0 - base), tile[h][j]);
        }
      }
    }
    if (staged && !whole && p0 + R - base == kChunk) flush(p0 + R);
  }
  if constexpr (R == 16) {
    if (direct && p0 < pixels) {  // the last R pixels as a tile, over some the tiles before wrote (the same bytes)
      p0 = pixels - R;
      ox = p0 % ow;
      row = cells + p0 / ow * row_step;
      Tile tile;
      for (int i = 0; i < R; i += 2) two(tile, i);
      LanesTileBytes<T>(oc, tile[0], d.output->y8 + d.at + p0, pixels, lanes);
      return;
    }
  }
  // The last pixels one by one, each channel's to its plane.
  for (; p0 < pixels; ++p0) {
    Tile tile;
    pixel(tile, 0);
    F y[kVectors];
    for (int h = 0; h < kVectors; ++h) y[h] = tile[h][0];
    T::ScatterLanes(out + (p0 - base), stride, y, lanes);
  }
  if (staged) flush(pixels);
}

template <class T, bool kPost, bool kBias>
void LanesGroups(const LanesFused& d, const uint8_t* cells) {
  constexpr int k3x3 = 3 * ((3 + T::kLaneTaps - 1) / T::kLaneTaps);  // a 3 x 3 kernel's tap groups
  if constexpr (T::kLaneTaps == 4) {  // (cells of 4 pixels serve two outputs of kernels up to 3 wide)
    if (d.step != d.sw) {
      d.groups == k3x3 ? LanesPixels<T, k3x3, kPost, kBias, true>(d, cells)
                       : LanesPixels<T, 0, kPost, kBias, true>(d, cells);
      return;
    }
  }
  d.groups == k3x3 ? LanesPixels<T, k3x3, kPost, kBias, false>(d, cells)
                   : LanesPixels<T, 0, kPost, kBias, false>(d, cells);
}

// LanesFused (kernels.h's lanes_fused).
template <class T>
void LanesFusedKernel(const LanesFused& d) {
  const uint8_t* cells = LanesCellsOf<T>(d);
  if (d.post) {
    d.bias != nullptr ? LanesGroups<T, true, true>(d, cells) : LanesGroups<T, true, false>(d, cells);
  } else {
    d.bias != nullptr ? LanesGroups<T, false, true>(d, cells) : LanesGroups<T, false, false>(d, cells);
  }
}

}  // namespace

}  // namespace onnxq::iconv
