// PostConv/IntConv's AVX2 kernels (int_conv_kernels.h). Compiled with -mavx2 -mfma
// (CMakeLists.txt); called only when IsaSupported(Isa::kAvx2).
//
// vpmaddubsw multiplies 32 uint8 activations by 32 int8 weights and adds adjacent pairs into
// int16 with saturation; for |w| <= 8 a pair is at most 2*255*8 = 4080 in magnitude, so it is
// exact, and so is the int16 sum of 8 such results (<= 32640). vpmaddwd with ones then widens
// them into the int32 sums of 4 k per pixel. Wider weights (IntConv bits >= 5) come split as
// w = 16*hi + lo with |hi|, |lo| <= 8: two exact vpmaddubsw streams, the high one widened by
// vpmaddwd with 16s.
#include <immintrin.h>

#include <cstring>

#include "kernels/int_conv_kernels.h"

namespace onnxq::iconv {

namespace {

constexpr int64_t kInt16Blocks = 8;  // blocks of 4 k summed in int16 before widening

inline __m256i Broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

inline __m256i Load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Rows [0, kRows) of one row block times 8 pixels; weights |w| <= 8. (One vector of pixels keeps
// the 4 int16 and 4 int32 accumulators in registers; wider tiles spill and run slower.)
void NarrowBlock(const int8_t* a, int64_t k4, const uint8_t* b, const int64_t* offsets, int32_t* c) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[kRows];
  for (auto& v : acc) v = _mm256_setzero_si256();
  for (int64_t i0 = 0; i0 < k4; i0 += kInt16Blocks) {
    const int64_t i1 = i0 + kInt16Blocks < k4 ? i0 + kInt16Blocks : k4;
    __m256i sum[kRows];
    for (auto& v : sum) v = _mm256_setzero_si256();
    for (int64_t i = i0; i < i1; ++i) {
      const __m256i x = Load(b + offsets[i]);
      for (int r = 0; r < kRows; ++r) {
        sum[r] = _mm256_add_epi16(sum[r], _mm256_maddubs_epi16(x, Broadcast4(a + (i * kRows + r) * 4)));
      }
    }
    for (int r = 0; r < kRows; ++r) acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(sum[r], ones));
  }
  for (int r = 0; r < kRows; ++r) _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * kPanel), acc[r]);
}

// The same for split weights A = 16 * a_hi + a_lo; the int32 sums wait in C between flushes.
void WideBlock(const int8_t* a_lo, const int8_t* a_hi, int64_t k4, const uint8_t* b, const int64_t* offsets,
               int32_t* c) {
  const __m256i ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
  for (int r = 0; r < kRows; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * kPanel), _mm256_setzero_si256());
  }
  for (int64_t i0 = 0; i0 < k4; i0 += kInt16Blocks) {
    const int64_t i1 = i0 + kInt16Blocks < k4 ? i0 + kInt16Blocks : k4;
    __m256i lo[kRows], hi[kRows];
    for (int r = 0; r < kRows; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
    for (int64_t i = i0; i < i1; ++i) {
      const __m256i x = Load(b + offsets[i]);
      for (int r = 0; r < kRows; ++r) {
        lo[r] = _mm256_add_epi16(lo[r], _mm256_maddubs_epi16(x, Broadcast4(a_lo + (i * kRows + r) * 4)));
        hi[r] = _mm256_add_epi16(hi[r], _mm256_maddubs_epi16(x, Broadcast4(a_hi + (i * kRows + r) * 4)));
      }
    }
    for (int r = 0; r < kRows; ++r) {
      auto* out = reinterpret_cast<__m256i*>(c + r * kPanel);
      __m256i acc = _mm256_add_epi32(_mm256_loadu_si256(out), _mm256_madd_epi16(hi[r], sixteen));
      _mm256_storeu_si256(out, _mm256_add_epi32(acc, _mm256_madd_epi16(lo[r], ones)));
    }
  }
}

// Transposed: 16 rows (one block of kLanes: two vectors of 8) times kPixels pixels from p0; |w| <= 8.
// Written pixel-major: c[p * rows + row].
template <int kPixels>
void BlockT(const int8_t* a, const GemmT& g, int64_t p0, int32_t* c) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t* pixels = g.pixel_offsets + p0;
  __m256i acc[2][kPixels];
  for (auto& row : acc) {
    for (auto& v : row) v = _mm256_setzero_si256();
  }
  for (int64_t i0 = 0; i0 < g.k4; i0 += kInt16Blocks) {
    const int64_t i1 = i0 + kInt16Blocks < g.k4 ? i0 + kInt16Blocks : g.k4;
    __m256i sum[2][kPixels];
    for (auto& row : sum) {
      for (auto& v : row) v = _mm256_setzero_si256();
    }
    for (int64_t i = i0; i < i1; ++i) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i * kLanes * 4));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i * kLanes * 4 + 32));
      const uint8_t* bi = g.b + g.b_offsets[i];
      for (int p = 0; p < kPixels; ++p) {
        int32_t x;
        std::memcpy(&x, bi + pixels[p], 4);
        const __m256i xv = _mm256_set1_epi32(x);
        sum[0][p] = _mm256_add_epi16(sum[0][p], _mm256_maddubs_epi16(xv, w0));
        sum[1][p] = _mm256_add_epi16(sum[1][p], _mm256_maddubs_epi16(xv, w1));
      }
    }
    for (int v = 0; v < 2; ++v) {
      for (int p = 0; p < kPixels; ++p) acc[v][p] = _mm256_add_epi32(acc[v][p], _mm256_madd_epi16(sum[v][p], ones));
    }
  }
  for (int v = 0; v < 2; ++v) {
    for (int p = 0; p < kPixels; ++p) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + (p0 + p) * g.rows + 8 * v), acc[v][p]);
    }
  }
}

}  // namespace

void GemmTAvx2(const GemmT& g) {
  for (int64_t rb = 0; rb < g.rows / kLanes; ++rb) {
    const int8_t* a = g.a + rb * g.k4 * kLanes * 4;
    int32_t* c = g.c + rb * kLanes;
    int64_t p = 0;
    for (; p + 2 <= g.pixels; p += 2) BlockT<2>(a, g, p, c);
    if (p < g.pixels) BlockT<1>(a, g, p, c);
  }
}

void GemmAvx2(const Gemm& g) {
  const int64_t block = g.k4 * kRows * 4;  // bytes of A per row block
  for (int64_t rb = 0; rb < g.rows / kRows; ++rb) {
    int32_t* c = g.c + rb * kRows * kPanel;
    for (int64_t p = 0; p < g.pixels; p += 8) {
      if (g.a_hi == nullptr) {
        NarrowBlock(g.a + rb * block, g.k4, g.b + 4 * p, g.b_offsets, c + p);
      } else {
        WideBlock(g.a + rb * block, g.a_hi + rb * block, g.k4, g.b + 4 * p, g.b_offsets, c + p);
      }
    }
  }
}

void TapsAvx2(const uint8_t* b, const int64_t* offsets, const int32_t* weights, int64_t taps, int64_t count,
              int32_t* out) {
  bool narrow = taps <= 16;  // |w| <= 8 and at most 16 taps: every sum fits int16 (16*255*8 = 32640)
  for (int64_t t = 0; t < taps; ++t) narrow = narrow && weights[t] >= -8 && weights[t] <= 8;
  int64_t i = 0;
  if (narrow) {  // 16 pixels per vector of int16 products, widened at the end
    for (; i + 16 <= count; i += 16) {
      __m256i acc = _mm256_setzero_si256();
      for (int64_t t = 0; t < taps; ++t) {
        const __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + offsets[t] + i)));
        acc = _mm256_add_epi16(acc, _mm256_mullo_epi16(x, _mm256_set1_epi16(static_cast<int16_t>(weights[t]))));
      }
      auto* dst = reinterpret_cast<__m256i*>(out + i);
      _mm256_storeu_si256(dst, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc)));
      _mm256_storeu_si256(dst + 1, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc, 1)));
    }
  }
  // x * w as vpmaddwd of (x, 0) and (w, 0) int16 pairs: exact for any int16 w.
  auto tap = [&](int64_t t, int64_t j) {
    const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + offsets[t] + j)));
    return _mm256_madd_epi16(x, _mm256_set1_epi32(weights[t] & 0xFFFF));
  };
  for (; i + 32 <= count; i += 32) {
    __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int64_t t = 0; t < taps; ++t) {
      for (int v = 0; v < 4; ++v) acc[v] = _mm256_add_epi32(acc[v], tap(t, i + 8 * v));
    }
    for (int v = 0; v < 4; ++v) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i + 8 * v), acc[v]);
  }
  for (; i < count; i += 8) {
    __m256i acc = _mm256_setzero_si256();
    for (int64_t t = 0; t < taps; ++t) acc = _mm256_add_epi32(acc, tap(t, i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), acc);
  }
}

void FinishRunAvx2(const int32_t* e, const int32_t* o, int64_t n, int32_t z_e, int32_t z_o, float c_e, float c_o,
                   const float* bias, float* out) {
  FinishRun(e, o, n, z_e, z_o, c_e, c_o, bias, out);
}

}  // namespace onnxq::iconv
