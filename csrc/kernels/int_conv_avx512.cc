// PostConv/IntConv's AVX-512 VNNI kernels (int_conv_kernels.h). Compiled with -mavx512f
// -mavx512bw -mavx512vnni (CMakeLists.txt); called only when IsaSupported(Isa::kAvx512).
//
// vpdpbusd multiplies 4 uint8 activations by 4 int8 weights and adds the four products to an
// int32 lane without intermediate saturation, so every int8 weight is exact.
#include <immintrin.h>

#include <cstring>

#include "kernels/int_conv_fused.h"
#include "kernels/int_conv_kernels.h"

namespace onnxq::iconv {

namespace {

// Clip (int_conv_kernels.h) lane by lane: max_ps(lo, y) = lo > y ? lo : y, min_ps(hi, y) = hi < y ? hi : y.
inline __m512 ClipPs(__m512 y, __m512 lo, __m512 hi) { return _mm512_min_ps(hi, _mm512_max_ps(lo, y)); }

}  // namespace

namespace {

// r[i][j] -> r[j][i] for 16 vectors of 16 floats: 2 x 2 blocks (unpack), 4 x 4 (shuffle), then
// the 128-bit lanes (two rounds of shuffle_f32x4).
inline void Transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

}  // namespace

}  // namespace onnxq::iconv

namespace onnxq::iconv {

namespace {

// 16 rows of 64 bytes, each 128-bit lane transposed on its own (r[i] lane l byte j -> r[j] lane l
// byte i): four rounds of interleaving row i with row i + 8 are a perfect shuffle that transposes
// a 16 x 16 matrix.
inline void TransposeBytes16x4(__m512i r[16]) {
  __m512i t[16];
  for (int round = 0; round < 4; ++round) {
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_epi8(r[i], r[i + 8]);
      t[2 * i + 1] = _mm512_unpackhi_epi8(r[i], r[i + 8]);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
  }
}

// The padded image of 16-byte pixels, then its cells (int_conv_kernels.h, LanesFused).
inline uint8_t* LanesCellsOf(const LanesFused& d) {
  const int64_t wt = d.wp + 4, wc = LanesCells(d.wp, d.step);
  uint8_t* img = d.scratch;
  uint8_t* cells = d.scratch + d.hp * wt * 16;
  // z where X does not land (the rows above and below it, the columns left and right of it): the
  // whole image at every block cost about as much as all the stores of X into it.
  const auto row_bytes = static_cast<size_t>(wt * 16);
  std::memset(img, d.z, static_cast<size_t>(d.pt) * row_bytes);
  std::memset(img + (d.pt + d.h) * wt * 16, d.z, static_cast<size_t>(d.hp - d.pt - d.h) * row_bytes);
  for (int64_t y = d.pt; y < d.pt + d.h; ++y) {
    std::memset(img + y * wt * 16, d.z, static_cast<size_t>(d.pl * 16));
    std::memset(img + (y * wt + d.pl + d.w) * 16, d.z, static_cast<size_t>((wt - d.pl - d.w) * 16));
  }
  const int64_t n = d.h * d.w;
  const __m512i z = _mm512_set1_epi8(static_cast<char>(d.z));
  const int64_t w = d.w;
  int64_t ix = 0;
  uint8_t* row = img + (d.pt * wt + d.pl) * 16;
  // Pixel p's 16 bytes to its place in the padded image.
  auto put = [&](__m128i pixel) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(row + ix * 16), pixel);
    if (++ix == w) {
      ix = 0;
      row += wt * 16;
    }
  };
  // 64 pixels of the 16 planes at a time: lane l of r[j] is pixel q0 + 16 l + j.
  for (int64_t q0 = 0; q0 < n; q0 += 64) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = i < d.lanes ? _mm512_loadu_si512(d.bytes + i * n + q0) : z;
    TransposeBytes16x4(r);
    int64_t left = n - q0;
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (j < left) put(_mm512_castsi512_si128(r[j]));
    }
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (16 + j < left) put(_mm512_extracti32x4_epi32(r[j], 1));
    }
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (32 + j < left) put(_mm512_extracti32x4_epi32(r[j], 2));
    }
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (48 + j < left) put(_mm512_extracti32x4_epi32(r[j], 3));
    }
  }
  // Cell (y, c) from the 4 pixels at step*c: the dwords of the 4 x 4 blocks of (pixel, channel
  // quad) transposed across the 128-bit lanes (lane l: channels 4l..4l+3 of pixels 0..3), then
  // each lane's 4 x 4 bytes (channel i's dword: its bytes of pixels 0..3).
  const __m512i lanes = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  // (bytes 0, 4, 8, 12, then 1, 5, 9, 13, ... of each lane)
  const __m512i bytes = _mm512_setr4_epi32(0x0C080400, 0x0D090501, 0x0E0A0602, 0x0F0B0703);
  const int64_t step = 16 * d.step, hp = d.hp;
  for (int64_t y = 0; y < hp; ++y) {
    const uint8_t* src = img + y * wt * 16;
    uint8_t* dst = cells + y * wc * 64;
    for (int64_t c = 0; c < wc; ++c, src += step, dst += 64) {
      const __m512i v = _mm512_permutexvar_epi32(lanes, _mm512_loadu_si512(src));
      _mm512_storeu_si512(dst, _mm512_shuffle_epi8(v, bytes));
    }
  }
  return cells;
}

// The sums and Finish lane by lane (the same float32 operations in the same order as
// FinishRunAvx512), 16 output pixels at a time, transposed so that each channel's pixels are one
// store. kGroups: d.groups, or 0 for a count known only at run time. kPaired: cells every second
// column at stride 1 (LanesStep), so that two outputs (ox even, ox + 1) share their cells' loads.
template <int kGroups, bool kPost, bool kBias, bool kPaired>
void LanesPixels(const LanesFused& d, const uint8_t* cells) {
  constexpr int kHeld = kGroups > 0 ? kGroups : 1;
  const int64_t groups = kGroups > 0 ? kGroups : d.groups;
  const int64_t wc = LanesCells(d.wp, d.step);
  __m512i we[kHeld], wo[kHeld];
  int64_t off[kHeld];
  if (kGroups > 0) {
    for (int t = 0; t < kHeld; ++t) {
      we[t] = _mm512_loadu_si512(d.weights + t * 16);
      wo[t] = _mm512_loadu_si512(d.weights + (groups + t) * 16);
      off[t] = d.offsets[t] * 64;
    }
  }
  const __m512i ze = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(d.z_e));
  const __m512i zo = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(d.z_o));
  const __m512 ce = _mm512_loadu_ps(d.c_e), co = _mm512_loadu_ps(d.c_o);
  const __m512 bias = kBias ? _mm512_loadu_ps(d.bias) : _mm512_setzero_ps();
  const __m512 clip_lo = _mm512_set1_ps(d.clip_lo), clip_hi = _mm512_set1_ps(d.clip_hi);
  const int64_t pixels = d.oh * d.ow, ow = d.ow, lanes = d.lanes, row_step = d.sh * wc * 64;
  float* const out = d.out;
  int64_t ox = 0;  // the next output pixel: column ox of the output row whose cells start at `row`
  const uint8_t* row = cells;
  auto advance = [&]() {
    if (++ox == ow) {
      ox = 0;
      row += row_step;
    }
  };
  // The 16 channels of one output from its cells v (the odd output of a pair: v shifted down a
  // byte, so the weights of taps 0..2 meet pixels 1..3), finished; the sums start from -z.
  auto finish = [&](const __m512i v[kHeld], bool odd) {
    __m512i acc_e = ze, acc_o = zo;
    for (int t = 0; t < kHeld; ++t) {
      const __m512i x = kPaired && odd ? _mm512_srli_epi32(v[t], 8) : v[t];
      acc_e = _mm512_dpbusd_epi32(acc_e, x, we[t]);
      if (kPost) acc_o = _mm512_dpbusd_epi32(acc_o, x, wo[t]);
    }
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc_e), ce);
    if (kPost) y = _mm512_add_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(acc_o), co));
    if (kBias) y = _mm512_add_ps(y, bias);
    return ClipPs(y, clip_lo, clip_hi);
  };
  auto load = [&](__m512i v[kHeld]) {
    const uint8_t* base = row + (kPaired ? ox >> 1 : ox) * 64;
    for (int t = 0; t < kHeld; ++t) v[t] = _mm512_loadu_si512(base + off[t]);
  };
  // The next output alone.
  auto pixel = [&]() {
    if (kGroups == 0) {  // (tap groups counted at run time: loaded one by one)
      const uint8_t* base = row + (kPaired ? ox >> 1 : ox) * 64;
      const bool odd = kPaired && (ox & 1) != 0;
      advance();
      __m512i acc_e = ze, acc_o = zo;
      for (int64_t t = 0; t < groups; ++t) {
        __m512i x = _mm512_loadu_si512(base + d.offsets[t] * 64);
        if (odd) x = _mm512_srli_epi32(x, 8);
        acc_e = _mm512_dpbusd_epi32(acc_e, x, _mm512_loadu_si512(d.weights + t * 16));
        if (kPost) acc_o = _mm512_dpbusd_epi32(acc_o, x, _mm512_loadu_si512(d.weights + (groups + t) * 16));
      }
      __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc_e), ce);
      if (kPost) y = _mm512_add_ps(y, _mm512_mul_ps(_mm512_cvtepi32_ps(acc_o), co));
      if (kBias) y = _mm512_add_ps(y, bias);
      return ClipPs(y, clip_lo, clip_hi);
    }
    __m512i v[kHeld];
    load(v);
    const bool odd = kPaired && (ox & 1) != 0;
    advance();
    return finish(v, odd);
  };
  // The next two outputs: one load of cells where they are a pair (ox even, ox + 1 in the row).
  auto two = [&](__m512& a, __m512& b) {
    if (!kPaired || kGroups == 0 || (ox & 1) != 0 || ox + 1 == ow) {
      a = pixel();
      b = pixel();
      return;
    }
    __m512i v[kHeld];
    load(v);
    ox += 2;  // (ox + 1 < ow: the row continues past the pair, or ends with it)
    if (ox == ow) {
      ox = 0;
      row += row_step;
    }
    a = finish(v, false);
    b = finish(v, true);
  };
  int64_t p0 = 0;
  // Whole blocks of 16 pixels: transposed, one store per channel.
  for (; p0 + 16 <= pixels; p0 += 16) {
    __m512 y[16];
#pragma GCC unroll 8
    for (int i = 0; i < 16; i += 2) two(y[i], y[i + 1]);
    Transpose16(y);
    if (lanes == 16) {
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) _mm512_storeu_ps(out + j * pixels + p0, y[j]);
    } else {
      for (int64_t j = 0; j < lanes; ++j) _mm512_storeu_ps(out + j * pixels + p0, y[j]);
    }
  }
  // The last pixels one by one, scattered to the channels' planes.
  if (p0 < pixels) {
    const __m512i planes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(static_cast<int32_t>(pixels)));
    const auto mask = static_cast<__mmask16>((1u << lanes) - 1);
    for (; p0 < pixels; ++p0) _mm512_mask_i32scatter_ps(out + p0, mask, planes, pixel(), 4);
  }
}

template <bool kPost, bool kBias>
void LanesGroups(const LanesFused& d, const uint8_t* cells) {
  const bool paired = d.step != d.sw;
  if (d.groups == 3) {  // 3 x 3 kernels
    paired ? LanesPixels<3, kPost, kBias, true>(d, cells) : LanesPixels<3, kPost, kBias, false>(d, cells);
  } else {
    paired ? LanesPixels<0, kPost, kBias, true>(d, cells) : LanesPixels<0, kPost, kBias, false>(d, cells);
  }
}

}  // namespace

void LanesFusedAvx512(const LanesFused& d) {
  const uint8_t* cells = LanesCellsOf(d);
  if (d.post) {
    d.bias != nullptr ? LanesGroups<true, true>(d, cells) : LanesGroups<true, false>(d, cells);
  } else {
    d.bias != nullptr ? LanesGroups<false, true>(d, cells) : LanesGroups<false, false>(d, cells);
  }
}

}  // namespace onnxq::iconv
