// PostConv/IntConv's depthwise kernels straight from the float input (int_conv_kernels.h:
// DepthwiseFused; its quantization QuantizeFused), written once over an instruction set's traits T
// (simd_kernels.h): the fused quantization, the padded plane, and the walk over output channels and
// blocks of matrix columns. What sums a block's taps is T::Fused, the one part of these kernels that
// is not the same algorithm on both instruction sets (each makes the most of its own multiply-add):
//   T::Fused::kBlock               matrix columns per block (a multiple of 16)
//   T::Fused::kTapGroups           whether Block reads d.groups tap groups (then instantiated for a
//                                  3 x 3 kernel's count too), or d.pairs (AVX2)
//   T::Fused::kQuantizeRows        whether the plane is quantized row by row in place
//                                  (QuantizePlane) rather than copied from d.bytes (BuildPlane)
//   T::Fused::Consts(d, i)         output channel i's constants, in registers (a FusedFinish)
//   T::Fused::Block<kPost, kBias, kGroups, kStride>(d, consts, p0, out)
//                                  matrix columns [p0, p0 + kBlock): the sums, Finish (consts'
//                                  FusedFinish), and the outputs of the kept columns stored at
//                                  out[starts[p0 / 8] ...] (kGroups: d.groups, or 0 for a count
//                                  known only at run time; kStride: d.sw, 1 or 2)
#pragma once

#include <immintrin.h>
#include <math.h>  // INFINITY

#include <cstdint>
#include <cstring>

#include "kernels/int_conv_finish.h"
#include "kernels/int_conv_kernels.h"
#include "kernels/quantize_dynamic_u8_kernels.h"

namespace onnxq::iconv {

namespace {

// The fused quantization's parameters (int_conv_kernels.h, FixedMagic), broadcast once per run.
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
};

// 4 vectors of values quantized (int_conv_kernels.h, FixedMagic) into T::kBytes bytes, in order:
// the multiply-add gives each value's fixed-point u; where any u is a tie (its low 12 bits 0:
// T::AnyFixedTie), the whole block takes QuantizeOne's exact steps instead (divide, clamp: NaN ->
// lo, round half to even; the value placed at bit 12 like u's). T::PackFixedBytes gathers bits
// 12..19 of each lane.
template <class T>
inline typename T::I QuantizeFixed(const FusedQuantizeConsts<T>& c, const typename T::F x[4]) {
  typename T::I u[4];
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
  return T::PackFixedBytes(u);
}

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

template <class T, bool kPost, bool kBias, int kGroups, int kStride>
void FusedBlocks(const DepthwiseFused& d, int64_t i) {
  using Fused = typename T::Fused;
  const typename Fused::Consts consts(d, i);
  float* out = d.out + i * d.pixels;
  for (int64_t p0 = 0; p0 < d.span; p0 += Fused::kBlock) {
    Fused::template Block<kPost, kBias, kGroups, kStride>(d, consts, p0, out);
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
  if constexpr (T::Fused::kQuantizeRows) {
    QuantizePlane<T>(d);
  } else {
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

}  // namespace

}  // namespace onnxq::iconv
