// DepthwiseFused (int_conv_kernels.h), the parts both instruction sets share: the padded plane, and
// the walk over output channels and blocks of matrix columns. Included only by int_conv_avx2.cc and
// int_conv_avx512.cc, each after defining its kernel struct K:
//   K::kBlock                      matrix columns per block (a multiple of 16)
//   K::kTapGroups                  whether Block reads d.groups tap groups (then instantiated for a
//                                  3 x 3 kernel's count too), or d.pairs (AVX2)
//   K::QuantizeRun(d, n, dst)      (QuantizeFused*) dst[i] = QuantizeOne(d.x[i]) for i < n; may write up to 64 bytes
//                                  past n, and reads no float past n
//   K::kQuantizeRows               whether the plane is quantized row by row in place (QuantizePlane,
//                                  with K::QuantizeConsts(d) and K::QuantizeRow(consts, x, n,
//                                  readable, dst), which may read `readable` floats from x and
//                                  writes z over the 32 bytes past n) rather than copied from
//                                  d.bytes (BuildPlane)
//   K::Consts(d, i)                output channel i's constants, in registers
//   K::Block<kPost, kBias, kGroups, kStride>(d, consts, p0, out)
//                                  matrix columns [p0, p0 + kBlock): the sums, Finish, and the
//                                  outputs of the kept columns stored at out[starts[p0 / 8] ...]
//                                  (kGroups: d.groups, or 0 for a count known only at run time;
//                                  kStride: d.sw, 1 or 2)
// Everything here is internal (anonymous namespace): each includer gets its own copy, compiled
// with its own instruction set.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/int_conv_kernels.h"
#include "kernels/quantize_dynamic_u8_kernels.h"

namespace onnxq::iconv {

namespace {

// The fused quantization's parameters (int_conv_kernels.h, FixedMagic), broadcast once per run into
// the includer's vectors. V supplies the float vector Ps, the int32 vector Pi and Set(float) /
// Set(int32_t) broadcasts for them.
template <class V>
struct FusedQuantizeConsts {
  typename V::Ps inverse, magic, lo, hi;  // the multiply-add and its clamp
  typename V::Ps scale, div_lo, div_hi;   // the division's
  typename V::Pi z;
  uint8_t z_byte;
  bool divide;                            // no inverse: every block by division
  explicit FusedQuantizeConsts(const DepthwiseFused& d)
      : inverse(V::Set(d.inverse)),
        magic(V::Set(FixedMagic(d.z))),
        lo(V::Set(FixedMagic(d.z) + d.lo)),
        hi(V::Set(FixedMagic(d.z) + d.hi)),
        scale(V::Set(d.scale)),
        div_lo(V::Set(d.lo)),
        div_hi(V::Set(d.hi)),
        z(V::Set(d.z)),
        z_byte(static_cast<uint8_t>(d.z)),
        divide(d.inverse == 0.0f) {}
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
template <class K>
void QuantizePlane(const DepthwiseFused& d) {
  if (d.fresh) std::memset(d.plane, d.z, static_cast<size_t>(d.sh * d.hq * d.wp + kFusedSlack));
  const typename K::QuantizeConsts consts(d);
  for (int64_t phase = 0; phase < d.sh; ++phase) {
    // Padded row y = pt + iy is in phase y % sh, row y / sh: each step of sh rows of X is one row
    // of the phase (no division per row).
    const int64_t iy0 = ((phase - d.pt) % d.sh + d.sh) % d.sh;
    uint8_t* dst = d.plane + (phase * d.hq + (d.pt + iy0) / d.sh) * d.wp + d.pl;
    for (int64_t iy = iy0; iy < d.h; iy += d.sh, dst += d.wp) {
      K::QuantizeRow(consts, d.x + iy * d.w, d.w, d.readable - iy * d.w, dst);
    }
  }
}

template <class K, bool kPost, bool kBias, int kGroups, int kStride>
void FusedBlocks(const DepthwiseFused& d, int64_t i) {
  const typename K::Consts consts(d, i);
  float* out = d.out + i * d.pixels;
  for (int64_t p0 = 0; p0 < d.span; p0 += K::kBlock) {
    K::template Block<kPost, kBias, kGroups, kStride>(d, consts, p0, out);
  }
}

template <class K, bool kPost, bool kBias, int kStride>
void FusedGroups(const DepthwiseFused& d, int64_t i) {
  if constexpr (!K::kTapGroups) {
    FusedBlocks<K, kPost, kBias, 0, kStride>(d, i);
  } else if (d.groups == 3) {  // 3 x 3 kernels: 3 groups of 4 taps (VNNI)
    FusedBlocks<K, kPost, kBias, 3, kStride>(d, i);
  } else {
    FusedBlocks<K, kPost, kBias, 0, kStride>(d, i);
  }
}

template <class K, bool kPost, bool kBias>
void FusedChannel(const DepthwiseFused& d, int64_t i) {
  d.sw == 2 ? FusedGroups<K, kPost, kBias, 2>(d, i) : FusedGroups<K, kPost, kBias, 1>(d, i);
}

template <class K>
void DepthwiseFusedT(const DepthwiseFused& d) {
  if constexpr (K::kQuantizeRows) {
    QuantizePlane<K>(d);
  } else {
    BuildPlane(d);
  }
  for (int64_t i = 0; i < d.outputs; ++i) {
    if (d.post) {
      d.bias != nullptr ? FusedChannel<K, true, true>(d, i) : FusedChannel<K, true, false>(d, i);
    } else {
      d.bias != nullptr ? FusedChannel<K, false, true>(d, i) : FusedChannel<K, false, false>(d, i);
    }
  }
}

}  // namespace

}  // namespace onnxq::iconv
