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
