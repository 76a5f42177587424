// PostConv/IntConv's AVX2 kernels (int_conv_kernels.h). Compiled with -mavx2 -mfma
// (CMakeLists.txt); called only when IsaSupported(Isa::kAvx2).
//
// vpmaddubsw multiplies 32 uint8 activations by 32 int8 weights and adds adjacent pairs into
// int16 with saturation; for |w| <= 8 a pair is at most 2*255*8 = 4080 in magnitude, so it is
// exact. The kernels add such results up in int16 registers (vpaddw) for as many blocks of 4 k as
// the weights allow (Int16Runs: at least 8, more where they are small; 4-bit codes are mostly
// small), then vpmaddwd with ones widens them into the int32 sums in C, which the kernels keep
// in memory (L1) to leave the registers to int16 accumulators: a tile of 4 rows x 16 pixels
// (Gemm) or 16 rows x 6 pixels (GemmT) loads 6 or 8 vectors per 8 or 12 vpmaddubsw. k runs in
// cache chunks (Gemm::chunk). Wider weights (IntConv bits >= 5) come split as w = 16*hi + lo with
// |hi|, |lo| <= 8: two exact vpmaddubsw streams of 8 blocks, the high one widened by vpmaddwd
// with 16s.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "kernels/int_conv_fused.h"
#include "kernels/int_conv_kernels.h"

namespace onnxq::iconv {

namespace {

// Clip (int_conv_kernels.h) lane by lane: max_ps(lo, y) = lo > y ? lo : y, min_ps(hi, y) = hi < y ? hi : y.
inline __m256 ClipPs(__m256 y, __m256 lo, __m256 hi) { return _mm256_min_ps(hi, _mm256_max_ps(lo, y)); }

inline __m256i Load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

}  // namespace

namespace {

// 8 x 8 floats transposed: r[i] holds row i, afterwards column i.
inline void Transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

}  // namespace

namespace {

// DepthwiseFused's AVX2 kernel (int_conv_fused.h): a block is 64 columns, two halves of 32 as 2
// phases, vector r holding columns 2i + r of the half in int16 lane i, so that each of its words is
// 2 adjacent bytes of a plane row: one vpmaddubsw per nonzero pair of taps (FusedPair), phase and
// half. Every list is narrow (sum |w| <= 128), so no pair saturates and the int16 sums, which start
// at -z_x * sum w, end exact. (Tried: an epilogue without lane-crossing widening (shifts, then
// vperm2f128), 1-2% slower.)
struct FusedAvx2 {
  static constexpr int64_t kBlock = 64;
  static constexpr bool kTapGroups = false;     // FusedPair lists instead
  static constexpr bool kQuantizeRows = true;   // QuantizePlane

  // QuantizeRun's parameters, broadcast once per run.
  struct Vectors {
    using Ps = __m256;
    using Pi = __m256i;
    static Ps Set(float v) { return _mm256_set1_ps(v); }
    static Pi Set(int32_t v) { return _mm256_set1_epi32(v); }
  };
  using QuantizeConsts = FusedQuantizeConsts<Vectors>;

  // 32 values quantized (int_conv_kernels.h, FixedMagic) into bytes, in order.
  static inline __m256i Quantize32(const QuantizeConsts& c, const __m256 x[4]) {
    __m256i u[4];
    bool ties = true;
    if (!c.divide) {
      // A tie has its low 12 bits 0: the least of the four vectors' low bits (shifted to the top)
      // is then 0 in its lane.
      __m256i least = _mm256_set1_epi32(-1);
      for (int k = 0; k < 4; ++k) {
        u[k] = _mm256_castps_si256(_mm256_min_ps(_mm256_max_ps(_mm256_fmadd_ps(x[k], c.inverse, c.magic), c.lo), c.hi));
        least = _mm256_min_epu32(least, _mm256_slli_epi32(u[k], 20));
      }
      const __m256i zero = _mm256_cmpeq_epi32(least, _mm256_setzero_si256());
      ties = !_mm256_testz_si256(zero, zero);
    }
    if (ties) {  // QuantizeAvx2's exact steps: divide, clamp (NaN -> lo), round half to even
      for (int k = 0; k < 4; ++k) {
        const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(x[k], c.scale), c.div_lo), c.div_hi);
        u[k] = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(t), c.z), 12);  // (the value at bit 12, like u)
      }
    }
    // Each u[k] holds value 8k + i at bits 12..19 of dword i: moved to byte k of dword i (shifts,
    // byte and word blends), then each 128-bit half's bytes grouped by k and the halves' groups
    // put in order.
    const __m256i byte1 = _mm256_set1_epi32(0x0000FF00), byte3 = _mm256_set1_epi32(static_cast<int32_t>(0xFF000000));
    const __m256i b01 = _mm256_blendv_epi8(_mm256_srli_epi32(u[0], 12), _mm256_srli_epi32(u[1], 4), byte1);
    const __m256i b23 = _mm256_blendv_epi8(_mm256_slli_epi32(u[2], 4), _mm256_slli_epi32(u[3], 12), byte3);
    const __m256i dwords = _mm256_blend_epi16(b01, b23, 0xAA);
    const __m256i order = _mm256_setr_epi32(0x0C080400, 0x0D090501, 0x0E0A0602, 0x0F0B0703, 0x0C080400, 0x0D090501,
                                            0x0E0A0602, 0x0F0B0703);
    return _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(dwords, order), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }

  static void QuantizeRun(const DepthwiseFused& d, int64_t n, uint8_t* dst) { QuantizeRun(QuantizeConsts(d), d.x, n, dst); }

  // dst[i] = src[i] quantized for i < n, then z for 32 bytes. `readable` floats from src may be
  // read: where that covers whole vectors, the row's last vector reads on (no masked loads) and
  // its bytes past n are set back to z.
  static void QuantizeRow(const QuantizeConsts& c, const float* src, int64_t n, int64_t readable, uint8_t* dst) {
    const int64_t whole = (n + 31) / 32 * 32;
    if (whole > readable) {
      QuantizeRun(c, src, n, dst);
    } else {
      __m256 x[4];
      for (int64_t i = 0; i < whole; i += 32) {
        for (int k = 0; k < 4; ++k) x[k] = _mm256_loadu_ps(src + i + 8 * k);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), Quantize32(c, x));
      }
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + n), _mm256_set1_epi8(static_cast<char>(c.z_byte)));
  }

  // dst[i] = src[i] quantized for i < n, and z up to the next multiple of 32 (0.0 quantizes to z).
  static void QuantizeRun(const QuantizeConsts& c, const float* src, int64_t n, uint8_t* dst) {
    __m256 x[4];
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      for (int k = 0; k < 4; ++k) x[k] = _mm256_loadu_ps(src + i + 8 * k);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), Quantize32(c, x));
    }
    if (i < n) {  // (lanes past n: 0)
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      for (int k = 0; k < 4; ++k) {
        const int64_t left = n - i - 8 * k;
        const __m256i inside = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(left > 8 ? 8 : left)), lane);
        x[k] = left > 0 ? _mm256_maskload_ps(src + i + 8 * k, inside) : _mm256_setzero_ps();
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), Quantize32(c, x));
    }
  }

  struct Consts {
    __m256i z_e, z_o;
    __m256 c_e, c_o, bias, clip_lo, clip_hi;
    bool clip;                          // not the default bounds, which change no bits (ClipPs)
    const FusedPair *even, *odd, *end;  // the lists' nonzero pairs: [even, odd), [odd, end)
    Consts(const DepthwiseFused& d, int64_t i)
        : z_e(_mm256_set1_epi16(static_cast<int16_t>(-d.z_e[i]))),
          z_o(_mm256_set1_epi16(static_cast<int16_t>(d.post ? -d.z_o[i] : 0))),
          c_e(_mm256_set1_ps(d.c_e[i])),
          c_o(_mm256_set1_ps(d.c_o[i])),
          bias(_mm256_set1_ps(d.bias != nullptr ? d.bias[i] : 0.0f)),
          clip_lo(_mm256_set1_ps(d.clip_lo)),
          clip_hi(_mm256_set1_ps(d.clip_hi)),
          clip(d.clip_lo != -INFINITY || d.clip_hi != INFINITY),
          even(d.pairs + d.pair_start[2 * i]),
          odd(d.pairs + d.pair_start[2 * i + 1]),
          end(d.pairs + d.pair_start[2 * i + 2]) {}
  };

  // The pairs' products added for two blocks of 32 columns, p0 and p0 + 32, each as 2 phases (stride
  // 1: columns 2i + r in word i of phase r; stride 2: columns 16r + i): a[r] for the first, b[r] for
  // the second; base = the plane at column p0. Each pair's offset and weights are loaded once for
  // 4 vpmaddubsw (the loads, not the multiply-adds, bound the sums). With one block only a[r].
  template <int kStride>
  static inline void AddPairs(const uint8_t* base, const FusedPair* pair, const FusedPair* end, __m256i a[2]) {
    for (; pair != end; ++pair) {
      const uint8_t* src = base + pair->offset;
      const __m256i w = _mm256_set1_epi32(pair->weights);
      for (int r = 0; r < 2; ++r) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + (kStride == 1 ? r : 32 * r)));
        a[r] = _mm256_add_epi16(a[r], _mm256_maddubs_epi16(x, w));
      }
    }
  }

  template <int kStride>
  static inline void AddPairs(const uint8_t* base, const FusedPair* pair, const FusedPair* end, __m256i a[2],
                              __m256i b[2]) {
    for (; pair != end; ++pair) {
      const uint8_t* src = base + pair->offset;
      const __m256i w = _mm256_set1_epi32(pair->weights);
      for (int r = 0; r < 2; ++r) {
        const int64_t at = kStride == 1 ? r : 32 * r;
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + at));
        const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * kStride + at));
        a[r] = _mm256_add_epi16(a[r], _mm256_maddubs_epi16(x, w));
        b[r] = _mm256_add_epi16(b[r], _mm256_maddubs_epi16(y, w));
      }
    }
  }

  // The two phases' int16 sums as int32 in column order: 0-7, 8-15, 16-23, 24-31.
  static inline void Widen(__m256i even, __m256i odd, __m256i out[4]) {
    const __m256i lo = _mm256_unpacklo_epi16(even, odd), hi = _mm256_unpackhi_epi16(even, odd);
    out[0] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo));
    out[1] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi));
    out[2] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo, 1));
    out[3] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi, 1));
  }

  // The int16 sums of 16 columns each (stride 2) as int32 in column order.
  static inline void Widen2(__m256i first, __m256i second, __m256i out[4]) {
    out[0] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(first));
    out[1] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(first, 1));
    out[2] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(second));
    out[3] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(second, 1));
  }

  // Stride 2 (column p at byte 2p): word i of vector h is column p0 + 16h + i, the whole vector
  // one load at 2 * (p0 + 16h).
  // Column group g (columns 8g .. 8g + 7) to its outputs: rows of the plane are whole groups
  // (PrepareFused), so the group's outputs are its first lanes. A whole vector where the lanes past
  // them fall on outputs that later vectors write (vmaskmovps stores are slow on AMD CPUs), else
  // only them.
  static inline void StoreKept(const DepthwiseFused& d, __m256 y, int64_t g, float* out) {
    const int64_t start = d.starts[g];
    if (start + 8 <= d.pixels) {
      _mm256_storeu_ps(out + start, y);
    } else {
      alignas(32) float kept[8];
      _mm256_store_ps(kept, y);
      for (int64_t j = 0, count = d.starts[g + 1] - start; j < count; ++j) out[start + j] = kept[j];
    }
  }

  // Finish (int_conv_kernels.h) lane by lane for the 32 columns from p0 (the same float32 operations
  // in the same order), and their outputs stored.
  template <bool kPost, bool kBias, int kStride>
  static inline void Finish32(const DepthwiseFused& d, const Consts& c, const __m256i e[2], const __m256i o[2],
                              int64_t p0, float* out) {
    __m256i e32[4], o32[4];
    if (kStride == 1) {
      Widen(e[0], e[1], e32);
      if (kPost) Widen(o[0], o[1], o32);
    } else {
      Widen2(e[0], e[1], e32);
      if (kPost) Widen2(o[0], o[1], o32);
    }
    for (int k = 0; k < 4; ++k) {
      __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(e32[k]), c.c_e);
      if (kPost) y = _mm256_add_ps(y, _mm256_mul_ps(_mm256_cvtepi32_ps(o32[k]), c.c_o));
      if (kBias) y = _mm256_add_ps(y, c.bias);
      StoreKept(d, c.clip ? ClipPs(y, c.clip_lo, c.clip_hi) : y, p0 / 8 + k, out);
    }
  }

  template <bool kPost, bool kBias, int kGroups, int kStride>
  static inline void Block(const DepthwiseFused& d, const Consts& c, int64_t p0, float* out) {
    __m256i e[2] = {c.z_e, c.z_e}, o[2] = {c.z_o, c.z_o}, e2[2] = {c.z_e, c.z_e}, o2[2] = {c.z_o, c.z_o};
    const uint8_t* base = d.plane + kStride * p0;
    if (p0 + 32 >= d.span) {  // the last columns: one block of 32
      AddPairs<kStride>(base, c.even, c.odd, e);
      if (kPost) AddPairs<kStride>(base, c.odd, c.end, o);
      Finish32<kPost, kBias, kStride>(d, c, e, o, p0, out);
      return;
    }
    AddPairs<kStride>(base, c.even, c.odd, e, e2);
    if (kPost) AddPairs<kStride>(base, c.odd, c.end, o, o2);
    Finish32<kPost, kBias, kStride>(d, c, e, o, p0, out);
    Finish32<kPost, kBias, kStride>(d, c, e2, o2, p0 + 32, out);
  }
};

}  // namespace

void DepthwiseFusedAvx2(const DepthwiseFused& d) { DepthwiseFusedT<FusedAvx2>(d); }
void QuantizeFusedAvx2(const DepthwiseFused& d, int64_t n, uint8_t* dst) { FusedAvx2::QuantizeRun(d, n, dst); }

}  // namespace onnxq::iconv

namespace onnxq::iconv {

namespace {

// 16 rows of 32 bytes, each 128-bit lane transposed on its own (r[i] lane l byte j -> r[j] lane l
// byte i): four rounds of interleaving row i with row i + 8 are a perfect shuffle.
inline void TransposeBytes16x2(__m256i r[16]) {
  __m256i t[16];
  for (int round = 0; round < 4; ++round) {
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm256_unpacklo_epi8(r[i], r[i + 8]);
      t[2 * i + 1] = _mm256_unpackhi_epi8(r[i], r[i + 8]);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
  }
}

// The padded image of 16-byte pixels, then its cells of 2 pixels (int_conv_kernels.h, LanesFused).
inline uint8_t* LanesCellsOf(const LanesFused& d) {
  const int64_t wt = d.wp + 4, wc = LanesCells(d.wp, d.step);
  uint8_t* img = d.scratch;
  uint8_t* cells = d.scratch + d.hp * wt * 16;
  std::memset(img, d.z, static_cast<size_t>(d.hp * wt * 16));
  const int64_t n = d.h * d.w, w = d.w;
  const __m256i z = _mm256_set1_epi8(static_cast<char>(d.z));
  int64_t ix = 0;
  uint8_t* row = img + (d.pt * wt + d.pl) * 16;
  auto put = [&](__m128i pixel) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(row + ix * 16), pixel);
    if (++ix == w) {
      ix = 0;
      row += wt * 16;
    }
  };
  // 32 pixels of the 16 planes at a time: lane l of r[j] is pixel q0 + 16 l + j.
  for (int64_t q0 = 0; q0 < n; q0 += 32) {
    __m256i r[16];
    for (int i = 0; i < 16; ++i) r[i] = i < d.lanes ? Load(d.bytes + i * n + q0) : z;
    TransposeBytes16x2(r);
    const int64_t left = n - q0;
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (j < left) put(_mm256_castsi256_si128(r[j]));
    }
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (16 + j < left) put(_mm256_extracti128_si256(r[j], 1));
    }
  }
  // Cell (y, c): channel i's word is its bytes of pixels sw*c and sw*c + 1.
  const int64_t step = 16 * d.sw, hp = d.hp;
  for (int64_t y = 0; y < hp; ++y) {
    const uint8_t* src = img + y * wt * 16;
    uint8_t* dst = cells + y * wc * 32;
    for (int64_t c = 0; c < wc; ++c, src += step, dst += 32) {
      const __m128i p0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
      const __m128i p1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                          _mm256_setr_m128i(_mm_unpacklo_epi8(p0, p1), _mm_unpackhi_epi8(p0, p1)));
    }
  }
  return cells;
}

// The int16 sums (exact: every list narrow, so each vpmaddubsw pair and each final sum fits, and
// vpaddw wraps), started from -z, and Finish lane by lane (the same float32 operations in the same
// order as FinishRunAvx2), 8 output pixels at a time (the last 8 overlapping the ones before;
// images of fewer than 8 pixels compute 8 and store their own), transposed 8 x 8 per half.
template <int kGroups, bool kPost, bool kBias>
void LanesPixels(const LanesFused& d, const uint8_t* cells) {
  constexpr int kHeld = kGroups > 0 ? kGroups : 1;
  const int64_t groups = kGroups > 0 ? kGroups : d.groups;
  const int64_t wc = LanesCells(d.wp, d.step);
  const auto* we = reinterpret_cast<const __m256i*>(d.pairs);
  const auto* wo = reinterpret_cast<const __m256i*>(d.pairs + groups * 16);
  int64_t off[kHeld];
  if (kGroups > 0) {
    for (int t = 0; t < kHeld; ++t) off[t] = d.offsets[t] * 32;
  }
  // -z as int16 (|z * sum w| <= 255 * 128), per lane.
  __m256i ze, zo;
  {
    const __m256i e0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d.z_e));
    const __m256i e1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d.z_e + 8));
    const __m256i o0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d.z_o));
    const __m256i o1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d.z_o + 8));
    ze = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_permute4x64_epi64(_mm256_packs_epi32(e0, e1), 0xD8));
    zo = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_permute4x64_epi64(_mm256_packs_epi32(o0, o1), 0xD8));
  }
  __m256 ce[2], co[2], bias[2];
  for (int h = 0; h < 2; ++h) {
    ce[h] = _mm256_loadu_ps(d.c_e + 8 * h);
    co[h] = _mm256_loadu_ps(d.c_o + 8 * h);
    bias[h] = kBias ? _mm256_loadu_ps(d.bias + 8 * h) : _mm256_setzero_ps();
  }
  const __m256 clip_lo = _mm256_set1_ps(d.clip_lo), clip_hi = _mm256_set1_ps(d.clip_hi);
  const int64_t pixels = d.oh * d.ow, ow = d.ow, lanes = d.lanes, row_step = d.sh * wc * 32;
  float* const out = d.out;
  for (int64_t p0 = 0; p0 < pixels; p0 += 8) {
    const int64_t first = pixels < 8 ? 0 : (p0 + 8 <= pixels ? p0 : pixels - 8);
    const int64_t count = pixels < 8 ? pixels : 8;
    int64_t ox = first % ow;
    const uint8_t* row = cells + first / ow * row_step;
    __m256 y[2][8];
    if (count < 8) {
      for (int i = 0; i < 8; ++i) y[0][i] = y[1][i] = _mm256_setzero_ps();
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const uint8_t* base = row + ox * 32;
      if (++ox == ow) {
        ox = 0;
        row += row_step;
      }
      __m256i e = ze, o = zo;
      if (kGroups > 0) {
        for (int t = 0; t < kHeld; ++t) {
          const __m256i v = Load(base + off[t]);
          e = _mm256_add_epi16(e, _mm256_maddubs_epi16(v, _mm256_loadu_si256(we + t)));
          if (kPost) o = _mm256_add_epi16(o, _mm256_maddubs_epi16(v, _mm256_loadu_si256(wo + t)));
        }
      } else {
        for (int64_t t = 0; t < groups; ++t) {
          const __m256i v = Load(base + d.offsets[t] * 32);
          e = _mm256_add_epi16(e, _mm256_maddubs_epi16(v, _mm256_loadu_si256(we + t)));
          if (kPost) o = _mm256_add_epi16(o, _mm256_maddubs_epi16(v, _mm256_loadu_si256(wo + t)));
        }
      }
      const __m128i he[2] = {_mm256_castsi256_si128(e), _mm256_extracti128_si256(e, 1)};
      const __m128i ho[2] = {_mm256_castsi256_si128(o), _mm256_extracti128_si256(o, 1)};
      for (int h = 0; h < 2; ++h) {
        __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(he[h])), ce[h]);
        if (kPost) v = _mm256_add_ps(v, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(ho[h])), co[h]));
        if (kBias) v = _mm256_add_ps(v, bias[h]);
        y[h][i] = ClipPs(v, clip_lo, clip_hi);
      }
      if (i + 1 == count) break;
    }
    for (int h = 0; h < 2; ++h) {
      Transpose8(y[h]);
      const int64_t channels = lanes - 8 * h < 8 ? lanes - 8 * h : 8;
      for (int64_t c = 0; c < channels; ++c) {
        float* dst = out + (8 * h + c) * pixels + first;
        if (count == 8) {
          _mm256_storeu_ps(dst, y[h][c]);
        } else {
          alignas(32) float tmp[8];
          _mm256_store_ps(tmp, y[h][c]);
          for (int64_t i = 0; i < count; ++i) dst[i] = tmp[i];
        }
      }
    }
  }
}

template <bool kPost, bool kBias>
void LanesGroups(const LanesFused& d, const uint8_t* cells) {
  if (d.groups == 6) {  // 3 x 3 kernels: 2 pairs per row
    LanesPixels<6, kPost, kBias>(d, cells);
  } else {
    LanesPixels<0, kPost, kBias>(d, cells);
  }
}

}  // namespace

void LanesFusedAvx2(const LanesFused& d) {
  const uint8_t* cells = LanesCellsOf(d);
  if (d.post) {
    d.bias != nullptr ? LanesGroups<true, true>(d, cells) : LanesGroups<true, false>(d, cells);
  } else {
    d.bias != nullptr ? LanesGroups<false, true>(d, cells) : LanesGroups<false, false>(d, cells);
  }
}

}  // namespace onnxq::iconv
