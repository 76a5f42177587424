// The SIMD kernels for AVX2 + FMA: the traits struct Avx2, which is all the AVX2-specific code, and
// the table of the kernel templates (simd_kernels.h) instantiated with it. Compiled with -mavx2
// -mfma (CMakeLists.txt); KernelsFor (kernels.cc) hands the table out only where
// IsaSupported(Isa::kAvx2). kernels_avx512.cc's Avx512 has the same members in the same order.
#include <immintrin.h>

#include <cstring>

#include "kernels/simd_kernels.h"

namespace onnxq {

namespace {

struct Avx2 {
  // Vectors: 256 bits.
  using I = __m256i;  // 32 bytes: 32 uint8, 16 int16 or 8 int32
  using F = __m256;   // 8 float32
  static constexpr int kBytes = 32;
  static constexpr int kFloats = 8;  // float32 (and int32) lanes of a vector

  // Loads and stores (unaligned).
  static I Load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static void Store(void* p, I v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
  static F LoadF(const float* p) { return _mm256_loadu_ps(p); }
  static void StoreF(float* p, F v) { _mm256_storeu_ps(p, v); }
  // Lanes [0, n) from p, 0 in the others; n may be <= 0 (nothing read) or >= kFloats. (vmaskmovps
  // loads are fast everywhere; only its stores are slow on AMD CPUs.)
  static F LoadFirstF(const float* p, int64_t n) {
    return n <= 0 ? _mm256_setzero_ps() : _mm256_maskload_ps(p, FirstLanes(n));
  }
  static I LoadFirst32(const int32_t* p, int64_t n) {
    return n <= 0 ? Zero() : _mm256_maskload_epi32(p, FirstLanes(n));
  }
  // Bytes [0, n) of v to p (0 <= n <= kBytes), in pieces of 16, 8, 4, 2 and 1 (no masked byte stores
  // in AVX2; a buffer and memcpy stalled on store forwarding).
  static void StoreFirst8(uint8_t* p, I v, int64_t n) {
    __m128i part = _mm256_castsi256_si128(v);
    if (n >= 16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), part);
      part = _mm256_extracti128_si256(v, 1);
      p += 16;
      n -= 16;
    }
    if (n >= 16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), part);
      return;
    }
    if (n >= 8) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(p), part);
      part = _mm_srli_si128(part, 8);
      p += 8;
      n -= 8;
    }
    uint64_t rest = static_cast<uint64_t>(_mm_cvtsi128_si64(part));
    for (int64_t i = 0; i < n; ++i, rest >>= 8) p[i] = static_cast<uint8_t>(rest);
  }
  // Lanes [0, n) of v to p (0 <= n <= kFloats): MaskStoreF with vmaskmovps, fast on Intel CPUs but
  // slow on AMD ones, StoreFirstF through memory with plain stores. (Each kernel uses the one it
  // was measured with.)
  static void MaskStoreF(float* p, F v, int64_t n) { _mm256_maskstore_ps(p, FirstLanes(n), v); }
  static void StoreFirstF(float* p, F v, int64_t n) {
    alignas(32) float lanes[kFloats];
    _mm256_store_ps(lanes, v);
    for (int64_t i = 0; i < n; ++i) p[i] = lanes[i];
  }

  // Arithmetic, lane by lane.
  static I Zero() { return _mm256_setzero_si256(); }
  static F ZeroF() { return _mm256_setzero_ps(); }
  static I Set8(int8_t v) { return _mm256_set1_epi8(v); }
  static I Set32(int32_t v) { return _mm256_set1_epi32(v); }
  static F SetF(float v) { return _mm256_set1_ps(v); }
  static I Add32(I a, I b) { return _mm256_add_epi32(a, b); }
  static I Sub32(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I Mul32(I a, I b) { return _mm256_mullo_epi32(a, b); }  // the low 32 bits of the product
  static I ShiftLeft32(I v, int bits) { return _mm256_slli_epi32(v, bits); }
  static I ShiftRight32(I v, int bits) { return _mm256_srli_epi32(v, bits); }  // logical
  static F Add(F a, F b) { return _mm256_add_ps(a, b); }
  static F Mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F Div(F a, F b) { return _mm256_div_ps(a, b); }
  static F MulAdd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c, rounded once
  // Min(a, b) = a < b ? a : b, Max(a, b) = a > b ? a : b (minps / maxps: b where either is NaN).
  static F Min(F a, F b) { return _mm256_min_ps(a, b); }
  static F Max(F a, F b) { return _mm256_max_ps(a, b); }
  // Clip (int_conv_kernels.h): max_ps(lo, y) = lo > y ? lo : y, min_ps(hi, y) = hi < y ? hi : y.
  static F Clip(F y, F lo, F hi) { return _mm256_min_ps(hi, _mm256_max_ps(lo, y)); }
  static F ToFloat(I v) { return _mm256_cvtepi32_ps(v); }     // rounds like the scalar conversion
  static I RoundToInt(F v) { return _mm256_cvtps_epi32(v); }  // half to even (the default rounding)
  static I AsInt(F v) { return _mm256_castps_si256(v); }      // the same bits

  // Widening and shuffles. 16 int16 lanes (one 256-bit vector) and 16 unsigned bytes as int32, in
  // 16 / kFloats vectors; MaddI16 = vpmaddwd (each int32 lane the sum of its two int16 products).
  static void WidenI16(__m256i v, I out[2]) {
    out[0] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v));
    out[1] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1));
  }
  static void WidenU8(__m128i v, I out[2]) {
    out[0] = _mm256_cvtepu8_epi32(v);
    out[1] = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(v, v));
  }
  static I MaddI16(I a, I b) { return _mm256_madd_epi16(a, b); }
  static F MoveHdup(F v) { return _mm256_movehdup_ps(v); }  // lanes 1 1 3 3 5 5 7 7
  // The even lanes of a, then those of b: per 128-bit half a0 a2 b0 b2, then the halves' pairs in
  // order.
  static F EvenLanes(F a, F b) {
    const __m256 pairs = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(pairs), _MM_SHUFFLE(3, 1, 2, 0)));
  }
  // kFloats x kFloats floats transposed: r[i] holds row i, afterwards column i. Always inlined, so
  // that the rows stay in registers.
  [[gnu::always_inline]] static void Transpose(F r[kFloats]) {
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

  // QuantizeDynamicU8 (quantize_dynamic_u8_simd.h). Four vectors of int32 in [0, 255] as kBytes
  // bytes, in order: the saturating packs are exact but work per 128-bit half, leaving 4-byte
  // groups in the order a0 b0 c0 d0 a1 b1 c1 d1.
  static I PackBytes(const I q[4]) {
    const I bytes = _mm256_packus_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }
  // The int32 lanes [0, n) of q, each in [0, 255], as n bytes at p (0 <= n <= kFloats).
  static void StoreBytesFirst(uint8_t* p, I q, int64_t n) {
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    alignas(16) uint8_t bytes[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(bytes), _mm_packus_epi16(words, words));
    for (int64_t i = 0; i < n; ++i) p[i] = bytes[i];
  }

  // The matrix products (int_conv_gemm.h): vpmaddubsw's int16 pair sums, exact for |w| <= 8,
  // summed in int16 for runs of blocks of k (Int16Runs) and widened into int32 sums kept in memory;
  // tiles of 4 rows x 16 pixels (Gemm) and 16 rows x 5 pixels (GemmT) load 6 or 7 vectors per 8 or
  // 10 vpmaddubsw. (GemmT's 6 pixels: 12 sums, 2 weight vectors, the broadcast and a product took all
  // 16 registers, and GCC moved sums between registers every block of k; 5 pixels: the forced-AVX2
  // ResNet-20 and MobileNetV2 int models 0.4-1.0 % faster at batch 1 and 8, 4 pixels slower than 5.)
  static constexpr bool kInt16Sums = true;
  static constexpr int kGemmVectors = 2;  // Gemm's tile: kRows rows x 2 vectors of pixels
  static constexpr int kGemmTBlocks = 1;  // GemmT's tile: 1 block of 16 rows (2 vectors) x 5 pixels
  static constexpr int GemmTPixels(int) { return 5; }
  // The 4 bytes at p in every int32 lane.
  static I Broadcast4(const void* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  }
  // acc + the sums of the products of adjacent pairs of unsigned bytes of x and signed bytes of w,
  // in int16 (saturating; exact for |w| <= 8).
  static I AddProducts(I acc, I x, I w) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(x, w)); }
  // The int16 pair sums alone (saturating; exact for |w| <= 64, whose pairs stay within 2 * 255 * 64).
  static I Products(I x, I w) { return _mm256_maddubs_epi16(x, w); }
  // GemmT's tile for wide weights (every block widened into int32 sums in registers): 4 pixels, so
  // that its 8 sums, 2 weight vectors, the activations and the widening constant fit 16 registers.
  static constexpr int GemmTWidePixels(int) { return 4; }
  // AddProducts' sums as int32 (each lane the sum of its two int16), and times 16.
  static I Widen(I sums) { return _mm256_madd_epi16(sums, _mm256_set1_epi16(1)); }
  static I WidenTimes16(I sums) { return _mm256_madd_epi16(sums, _mm256_set1_epi16(16)); }
  // GCC 12 spills the int16 sums of the products' tiles unless an empty asm makes it believe they
  // change in their registers (no such trouble with the weights).
  static constexpr bool kPinSums = true;
  static constexpr bool kPinWeights = false;
  static void Pin(I& v) { __asm__("" : "+x"(v)); }

  // The fused quantization (int_conv_fused.h, QuantizeFixed). Whether any lane of u[0..3] has its
  // low 12 bits 0 (a tie): the least of the lanes' low bits, shifted to the top, is then 0.
  static bool AnyFixedTie(const I u[4]) {
    I least = _mm256_slli_epi32(u[0], 20);
    for (int k = 1; k < 4; ++k) least = _mm256_min_epu32(least, _mm256_slli_epi32(u[k], 20));
    const I zero = _mm256_cmpeq_epi32(least, _mm256_setzero_si256());
    return !_mm256_testz_si256(zero, zero);
  }
  // Bits 12..19 of each dword of u[0..3] (value 8k + i in dword i of u[k]) as kBytes bytes in
  // order: moved to byte k of dword i (shifts, byte and word blends), then each 128-bit half's bytes
  // grouped by k and the halves' groups put in order.
  static I PackFixedBytes(const I u[4]) {
    const I dwords = FixedDwords(u);
    const I order = _mm256_setr_epi32(0x0C080400, 0x0D090501, 0x0E0A0602, 0x0F0B0703, 0x0C080400, 0x0D090501,
                                      0x0E0A0602, 0x0F0B0703);
    return _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(dwords, order), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }
  // Quarter k of v (bytes 8k .. 8k + 7) to to[k].
  static void StoreQuarters(uint8_t* const to[4], I v) {
    const __m128i low = _mm256_castsi256_si128(v), high = _mm256_extracti128_si256(v, 1);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(to[0]), low);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(to[1]), _mm_unpackhi_epi64(low, low));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(to[2]), high);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(to[3]), _mm_unpackhi_epi64(high, high));
  }
  // The first n bytes (n <= 8) of quarter k of v to to[k].
  static void StoreQuartersFirst(uint8_t* const to[4], I v, int64_t n) {
    const __m128i low = _mm256_castsi256_si128(v), high = _mm256_extracti128_si256(v, 1);
    StoreFirst8(to[0], _mm256_castsi128_si256(low), n);
    StoreFirst8(to[1], _mm256_castsi128_si256(_mm_unpackhi_epi64(low, low)), n);
    StoreFirst8(to[2], _mm256_castsi128_si256(high), n);
    StoreFirst8(to[3], _mm256_castsi128_si256(_mm_unpackhi_epi64(high, high)), n);
  }
  // Bits 12..19 of dword i of u[k] as byte k of dword i.
  static I FixedDwords(const I u[4]) {
    const I byte1 = _mm256_set1_epi32(0x0000FF00), byte3 = _mm256_set1_epi32(static_cast<int32_t>(0xFF000000));
    const I b01 = _mm256_blendv_epi8(_mm256_srli_epi32(u[0], 12), _mm256_srli_epi32(u[1], 4), byte1);
    const I b23 = _mm256_blendv_epi8(_mm256_slli_epi32(u[2], 4), _mm256_slli_epi32(u[3], 12), byte3);
    return _mm256_blend_epi16(b01, b23, 0xAA);
  }

  // FinishTBytes (int_conv_finish.h): 4 x 4 dwords transposed in each 128-bit half (dword i of v[k]
  // to dword k of v[i]), and 16 bytes from or to each of p[0..1] as the halves of v.
  static void TransposeDwords4(I v[4]) {
    const I a = _mm256_unpacklo_epi32(v[0], v[1]), b = _mm256_unpacklo_epi32(v[2], v[3]);
    const I c = _mm256_unpackhi_epi32(v[0], v[1]), d = _mm256_unpackhi_epi32(v[2], v[3]);
    v[0] = _mm256_unpacklo_epi64(a, b);
    v[1] = _mm256_unpackhi_epi64(a, b);
    v[2] = _mm256_unpacklo_epi64(c, d);
    v[3] = _mm256_unpackhi_epi64(c, d);
  }
  static I LoadLanes(const uint8_t* const p[2]) {
    return _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(p[1]), reinterpret_cast<const __m128i*>(p[0]));
  }
  static void StoreLanes(I v, uint8_t* const p[2]) {
    _mm256_storeu2_m128i(reinterpret_cast<__m128i*>(p[1]), reinterpret_cast<__m128i*>(p[0]), v);
  }
  static void StoreLanesFirst(I v, uint8_t* const p[2], int64_t n) {  // (n <= 16)
    StoreFirst8(p[0], v, n);
    StoreFirst8(p[1], _mm256_permute2x128_si256(v, v, 0x11), n);
  }

  // LanesFused (int_conv_fused.h): cells of 2 pixels, the 16 channels' sums in int16 lanes.
  static constexpr int kLaneTaps = 2;
  static I InterleaveLo8(I a, I b) { return _mm256_unpacklo_epi8(a, b); }  // per 128-bit half
  static I InterleaveHi8(I a, I b) { return _mm256_unpackhi_epi8(a, b); }
  template <int kLane>
  static __m128i Lane128(I v) {
    if constexpr (kLane == 0) {
      return _mm256_castsi256_si128(v);
    } else {
      return _mm256_extracti128_si256(v, kLane);
    }
  }
  // The cell of the 2 pixels (16 bytes each) at p: channel i's word is its bytes of the two.
  static I LaneCell(const uint8_t* p) {
    const __m128i p0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i p1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
    return _mm256_setr_m128i(_mm_unpacklo_epi8(p0, p1), _mm_unpackhi_epi8(p0, p1));
  }
  // -z[i] in lane i of the sums (|z * sum w| <= 255 * 128 fits int16).
  static I LaneSumsFrom(const int32_t* z) {
    const I lo = Load(z), hi = Load(z + 8);
    return _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8));
  }
  static void LaneInt32(I sums, I out[2]) { WidenI16(sums, out); }
  // Lanes [0, lanes) of the 16 in y[0], y[1]: lane i to p[i * stride].
  static void ScatterLanes(float* p, int64_t stride, const F y[2], int64_t lanes) {
    alignas(32) float v[16];
    _mm256_store_ps(v, y[0]);
    _mm256_store_ps(v + 8, y[1]);
    for (int64_t i = 0; i < lanes; ++i) p[i * stride] = v[i];
  }

  // DepthwiseFused (int_conv_fused.h): its blocks' tap sums, below.
  struct Fused;

 private:
  // All ones in lanes [0, min(n, kFloats)), for vmaskmovps.
  static I FirstLanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(n < kFloats ? n : kFloats)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
};

// DepthwiseFused's block for AVX2: 64 columns, two halves of 32 as 2 phases, vector r holding
// columns 2i + r of the half in int16 lane i, so that each of its words is 2 adjacent bytes of a
// plane row: one vpmaddubsw per nonzero pair of taps (FusedPair), phase and half, which halves
// PostConv's sums against dense pairs (a POST code is in one of its two lists). Every list is narrow
// (sum |w| <= 128), so no pair saturates and the int16 sums, which start at -z_x * sum w, end exact.
// Rows of the plane are whole groups of 8 columns (kRowColumns), so a group's outputs are its first
// lanes. (Tried: an epilogue without lane-crossing widening (shifts, then vperm2f128), 1-2% slower.)
struct Avx2::Fused {
  static constexpr int64_t kBlock = 64;
  static constexpr bool kTapGroups = false;    // FusedPair lists instead
  static constexpr bool kQuantizeRows = true;  // QuantizePlane
  static constexpr int kRowColumns = 8;

  struct Consts : iconv::FusedFinish<Avx2> {
    I z_e, z_o;                                // -z_x * sum w of each list, int16
    const iconv::FusedPair *even, *odd, *end;  // the lists' nonzero pairs: [even, odd), [odd, end)
    Consts(const iconv::DepthwiseFused& d, int64_t i)
        : FusedFinish<Avx2>(d, i),
          z_e(_mm256_set1_epi16(static_cast<int16_t>(-d.z_e[i]))),
          z_o(_mm256_set1_epi16(static_cast<int16_t>(d.post ? -d.z_o[i] : 0))),
          even(d.pairs + d.pair_start[2 * i]),
          odd(d.pairs + d.pair_start[2 * i + 1]),
          end(d.pairs + d.pair_start[2 * i + 2]) {}
  };

  // The pairs' products added for two blocks of 32 columns, p0 and p0 + 32, each as 2 phases
  // (stride 1: columns 2i + r in word i of phase r; stride 2 (column p at byte 2p): columns 16r + i,
  // the whole vector one load at 2 * (p0 + 16r)): a[r] for the first, b[r] for the second; base =
  // the plane at column p0. Each pair's offset and weights are loaded once for 4 vpmaddubsw (the
  // loads, not the multiply-adds, bound the sums). With one block only a[r].
  template <int kStride>
  static void AddPairs(const uint8_t* base, const iconv::FusedPair* pair, const iconv::FusedPair* end, I a[2]) {
    for (; pair != end; ++pair) {
      const uint8_t* src = base + pair->offset;
      const I w = _mm256_set1_epi32(pair->weights);
      for (int r = 0; r < 2; ++r) a[r] = AddProducts(a[r], Load(src + (kStride == 1 ? r : 32 * r)), w);
    }
  }

  template <int kStride>
  static void AddPairs(const uint8_t* base, const iconv::FusedPair* pair, const iconv::FusedPair* end, I a[2],
                       I b[2]) {
    for (; pair != end; ++pair) {
      const uint8_t* src = base + pair->offset;
      const I w = _mm256_set1_epi32(pair->weights);
      for (int r = 0; r < 2; ++r) {
        const int64_t at = kStride == 1 ? r : 32 * r;
        const I x = Load(src + at), y = Load(src + 32 * kStride + at);
        a[r] = AddProducts(a[r], x, w);
        b[r] = AddProducts(b[r], y, w);
      }
    }
  }

  // A half's int16 sums as int32 in column order: 0-7, 8-15, 16-23, 24-31. Stride 1: the two
  // phases interleaved; stride 2: the two vectors of 16 columns one after the other.
  template <int kStride>
  static void Widen(const I s[2], I out[4]) {
    if (kStride == 1) {
      const I lo = _mm256_unpacklo_epi16(s[0], s[1]), hi = _mm256_unpackhi_epi16(s[0], s[1]);
      out[0] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo));
      out[1] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi));
      out[2] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo, 1));
      out[3] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi, 1));
    } else {
      WidenI16(s[0], out);
      WidenI16(s[1], out + 2);
    }
  }

  // Column group g (columns 8g .. 8g + 7) to its outputs, its first lanes: a whole vector where the
  // lanes past them fall on outputs that later vectors write, else only them.
  static void StoreKept(const iconv::DepthwiseFused& d, F y, int64_t g, float* out, int64_t first) {
    const int64_t start = d.starts[g];
    if (start + 8 <= d.pixels) {
      StoreF(out + (start - first), y);
    } else {
      StoreFirstF(out + (start - first), y, d.starts[g + 1] - start);
    }
  }

  // The 32 columns of a half from p0 finished, and their outputs stored.
  template <bool kPost, bool kBias, int kStride>
  static void Finish32(const iconv::DepthwiseFused& d, const Consts& c, const I e[2], const I o[2], int64_t p0,
                       float* out, int64_t first) {
    I e32[4], o32[4] = {};
    Widen<kStride>(e, e32);
    if (kPost) Widen<kStride>(o, o32);
    for (int k = 0; k < 4; ++k) StoreKept(d, c.template Finish<kPost, kBias>(e32[k], o32[k]), p0 / 8 + k, out, first);
  }

  template <bool kPost, bool kBias, int kGroups, int kStride>
  static void Block(const iconv::DepthwiseFused& d, const Consts& c, int64_t p0, float* out, int64_t first) {
    I e[2] = {c.z_e, c.z_e}, o[2] = {c.z_o, c.z_o}, e2[2] = {c.z_e, c.z_e}, o2[2] = {c.z_o, c.z_o};
    const uint8_t* base = d.plane + kStride * p0;
    if (p0 + 32 >= d.span) {  // the last columns: one half
      AddPairs<kStride>(base, c.even, c.odd, e);
      if (kPost) AddPairs<kStride>(base, c.odd, c.end, o);
      Finish32<kPost, kBias, kStride>(d, c, e, o, p0, out, first);
      return;
    }
    AddPairs<kStride>(base, c.even, c.odd, e, e2);
    if (kPost) AddPairs<kStride>(base, c.odd, c.end, o, o2);
    Finish32<kPost, kBias, kStride>(d, c, e, o, p0, out, first);
    Finish32<kPost, kBias, kStride>(d, c, e2, o2, p0 + 32, out, first);
  }
};

}  // namespace

extern const Kernels kAvx2Kernels = SimdKernels<Avx2>();

}  // namespace onnxq
