// The SIMD kernels for AVX-512 (F, BW) with VNNI: the traits struct Avx512, which is all the
// AVX-512-specific code, and the table of the kernel templates (simd_kernels.h) instantiated with
// it. Compiled with -mavx512f -mavx512bw -mavx512vnni (CMakeLists.txt); KernelsFor (kernels.cc)
// hands the table out only where IsaSupported(Isa::kAvx512).
#include <immintrin.h>

#include <cstring>

#include "kernels/simd_kernels.h"

namespace onnxq {

namespace {

// 512-bit vectors and mask registers. The members are those of kernels_avx2.cc's Avx2.
struct Avx512 {
  using I = __m512i;  // 64 bytes: 64 uint8, 32 int16 or 16 int32
  using F = __m512;   // 16 float32
  static constexpr int kBytes = 64;
  static constexpr int kFloats = 16;  // float32 (and int32) lanes of a vector

  // Loads and stores (unaligned).
  static I Load(const void* p) { return _mm512_loadu_si512(p); }
  static void Store(void* p, I v) { _mm512_storeu_si512(p, v); }
  static F LoadF(const float* p) { return _mm512_loadu_ps(p); }
  static void StoreF(float* p, F v) { _mm512_storeu_ps(p, v); }
  // Lanes [0, n) from p, 0 in the others; n may be <= 0 (nothing read) or >= kFloats.
  static F LoadFirstF(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(FirstLanes(n), p); }
  static I LoadFirst32(const int32_t* p, int64_t n) { return _mm512_maskz_loadu_epi32(FirstLanes(n), p); }
  // Lanes [0, n) of v to p (0 <= n <= kFloats); the two are one here (Avx2's differ).
  static void MaskStoreF(float* p, F v, int64_t n) { _mm512_mask_storeu_ps(p, FirstLanes(n), v); }
  static void StoreFirstF(float* p, F v, int64_t n) { _mm512_mask_storeu_ps(p, FirstLanes(n), v); }
  // The int32 lanes [0, n) of q, each in [0, 255], as n bytes at p (0 <= n <= kFloats).
  static void StoreBytesFirst(uint8_t* p, I q, int64_t n) { _mm512_mask_cvtusepi32_storeu_epi8(p, FirstLanes(n), q); }

  // Arithmetic, lane by lane.
  static F SetF(float v) { return _mm512_set1_ps(v); }
  static I Set32(int32_t v) { return _mm512_set1_epi32(v); }
  static F ZeroF() { return _mm512_setzero_ps(); }
  static I Add32(I a, I b) { return _mm512_add_epi32(a, b); }
  static I Sub32(I a, I b) { return _mm512_sub_epi32(a, b); }
  static F ToFloat(I v) { return _mm512_cvtepi32_ps(v); }  // rounds like the scalar conversion
  static F Add(F a, F b) { return _mm512_add_ps(a, b); }
  static F Mul(F a, F b) { return _mm512_mul_ps(a, b); }
  // Min(a, b) = a < b ? a : b, Max(a, b) = a > b ? a : b (minps / maxps: b where either is NaN).
  static F Min(F a, F b) { return _mm512_min_ps(a, b); }
  static F Max(F a, F b) { return _mm512_max_ps(a, b); }
  static F Div(F a, F b) { return _mm512_div_ps(a, b); }
  static I RoundToInt(F v) { return _mm512_cvtps_epi32(v); }  // half to even (the default rounding)
  // Clip (int_conv_kernels.h) lane by lane: max_ps(lo, y) = lo > y ? lo : y, min_ps(hi, y) = hi < y ? hi : y.
  static F Clip(F y, F lo, F hi) { return _mm512_min_ps(hi, _mm512_max_ps(lo, y)); }

  // Widening: 16 int16 lanes (one 256-bit vector) and 16 unsigned bytes as int32, in 16 / kFloats
  // vectors; MaddI16 = vpmaddwd (each int32 lane the sum of its two int16 products).
  static void WidenI16(__m256i v, I out[1]) { out[0] = _mm512_cvtepi16_epi32(v); }
  static void WidenU8(__m128i v, I out[1]) { out[0] = _mm512_cvtepu8_epi32(v); }
  static I MaddI16(I a, I b) { return _mm512_madd_epi16(a, b); }

  // Shuffles.
  static F MoveHdup(F v) { return _mm512_movehdup_ps(v); }  // lanes 1 1 3 3 5 5 ...
  // The even lanes of a, then those of b.
  static F EvenLanes(F a, F b) {
    return _mm512_permutex2var_ps(a, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), b);
  }
  // kFloats x kFloats floats transposed (r[i] holds row i, afterwards column i): 2 x 2 blocks
  // (unpack), 4 x 4 (shuffle), then the 128-bit lanes (two rounds of shuffle_f32x4).
  static void Transpose(F r[kFloats]) {
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

  // The matrix products (int_conv_gemm.h): vpdpbusd adds 4 products of uint8 activations and int8
  // weights into an int32 lane, exact for any weights; the sums stay in registers over all of k.
  static constexpr bool kInt16Sums = false;
  static constexpr int kGemmVectors = 4;  // Gemm's tile: kRows rows x 4 vectors (64 pixels)
  static constexpr int kGemmTBlocks = 4;  // GemmT's tile: 4 blocks of 16 rows x 4 pixels (wider: GCC 12 spills)
  static constexpr int kGemmTPixels = 4;
  static I Zero() { return _mm512_setzero_si512(); }
  // The 4 bytes at p in every int32 lane.
  static I Broadcast4(const void* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  // acc + the sums of the products of each 4 unsigned bytes of x and signed bytes of w, in int32.
  static I AddProducts(I acc, I x, I w) { return _mm512_dpbusd_epi32(acc, x, w); }
  static I Widen(I sums) { return sums; }  // (already int32)
  // GCC 12 copies the tiles' sums between registers around every vpdpbusd (and spills some), and
  // reloads GemmT's weights as a memory operand of each (3/4 of the speed), unless an empty asm
  // makes it believe they change in their registers.
  static constexpr bool kPinSums = true;
  static constexpr bool kPinWeights = true;
  static void Pin(I& v) { __asm__("" : "+v"(v)); }

  // Four vectors of int32 in [0, 255] as kBytes bytes, in order: the saturating packs are exact but
  // work per 128-bit lane (lane l: a, b, c, d's dwords 4l..4l+3), so dword 4l + j goes to 4j + l.
  static I PackBytes(const I q[4]) {
    const I bytes = _mm512_packus_epi16(_mm512_packs_epi32(q[0], q[1]), _mm512_packs_epi32(q[2], q[3]));
    return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), bytes);
  }

 private:
  // Lanes [0, min(n, kFloats)), none for n <= 0.
  static __mmask16 FirstLanes(int64_t n) {
    return n >= kFloats ? static_cast<__mmask16>(0xFFFF) : n > 0 ? static_cast<__mmask16>((1u << n) - 1) : 0;
  }
};

constexpr Kernels Avx512Kernels() {
  Kernels k = SimdKernels<Avx512>();
  // (not yet templates)
  k.depthwise_fused = iconv::DepthwiseFusedAvx512;
  k.quantize_fused = iconv::QuantizeFusedAvx512;
  k.lanes_fused = iconv::LanesFusedAvx512;
  return k;
}

}  // namespace

extern const Kernels kAvx512Kernels = Avx512Kernels();

}  // namespace onnxq
