// The SIMD kernels for AVX-512 (F, BW) with VNNI: the traits struct Avx512, which is all the
// AVX-512-specific code, and the table of the kernel templates (simd_kernels.h) instantiated with
// it. Compiled with -mavx512f -mavx512bw -mavx512vnni (CMakeLists.txt); KernelsFor (kernels.cc)
// hands the table out only where IsaSupported(Isa::kAvx512). kernels_avx2.cc's Avx2 has the same
// members in the same order.
#include <immintrin.h>

#include <cstring>

#include "kernels/simd_kernels.h"

namespace onnxq {

namespace {

struct Avx512 {
  // Vectors: 512 bits, and mask registers for partial ones.
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
  // Bytes [0, n) of v to p (0 <= n <= kBytes).
  static void StoreFirst8(uint8_t* p, I v, int64_t n) {
    _mm512_mask_storeu_epi8(p, n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1, v);
  }
  // Lanes [0, n) of v to p (0 <= n <= kFloats); the two are one here (Avx2's differ).
  static void MaskStoreF(float* p, F v, int64_t n) { _mm512_mask_storeu_ps(p, FirstLanes(n), v); }
  static void StoreFirstF(float* p, F v, int64_t n) { _mm512_mask_storeu_ps(p, FirstLanes(n), v); }

  // Arithmetic, lane by lane.
  static I Zero() { return _mm512_setzero_si512(); }
  static F ZeroF() { return _mm512_setzero_ps(); }
  static I Set8(int8_t v) { return _mm512_set1_epi8(v); }
  static I Set32(int32_t v) { return _mm512_set1_epi32(v); }
  static F SetF(float v) { return _mm512_set1_ps(v); }
  static I Add32(I a, I b) { return _mm512_add_epi32(a, b); }
  static I Sub32(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I Mul32(I a, I b) { return _mm512_mullo_epi32(a, b); }  // the low 32 bits of the product
  static I ShiftLeft32(I v, int bits) { return _mm512_slli_epi32(v, bits); }
  static I ShiftRight32(I v, int bits) { return _mm512_srli_epi32(v, bits); }  // logical
  static F Add(F a, F b) { return _mm512_add_ps(a, b); }
  static F Mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F Div(F a, F b) { return _mm512_div_ps(a, b); }
  static F MulAdd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c, rounded once
  // Min(a, b) = a < b ? a : b, Max(a, b) = a > b ? a : b (minps / maxps: b where either is NaN).
  static F Min(F a, F b) { return _mm512_min_ps(a, b); }
  static F Max(F a, F b) { return _mm512_max_ps(a, b); }
  // Clip (int_conv_kernels.h): max_ps(lo, y) = lo > y ? lo : y, min_ps(hi, y) = hi < y ? hi : y.
  static F Clip(F y, F lo, F hi) { return _mm512_min_ps(hi, _mm512_max_ps(lo, y)); }
  static F ToFloat(I v) { return _mm512_cvtepi32_ps(v); }     // rounds like the scalar conversion
  static I RoundToInt(F v) { return _mm512_cvtps_epi32(v); }  // half to even (the default rounding)
  static I AsInt(F v) { return _mm512_castps_si512(v); }      // the same bits

  // Widening and shuffles. 16 int16 lanes (one 256-bit vector) and 16 unsigned bytes as int32, in
  // 16 / kFloats vectors; MaddI16 = vpmaddwd (each int32 lane the sum of its two int16 products).
  static void WidenI16(__m256i v, I out[1]) { out[0] = _mm512_cvtepi16_epi32(v); }
  static void WidenU8(__m128i v, I out[1]) { out[0] = _mm512_cvtepu8_epi32(v); }
  static I MaddI16(I a, I b) { return _mm512_madd_epi16(a, b); }
  static F MoveHdup(F v) { return _mm512_movehdup_ps(v); }  // lanes 1 1 3 3 5 5 ...
  // The even lanes of a, then those of b.
  static F EvenLanes(F a, F b) {
    return _mm512_permutex2var_ps(a, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), b);
  }
  // kFloats x kFloats floats transposed (r[i] holds row i, afterwards column i): 2 x 2 blocks
  // (unpack), 4 x 4 (shuffle), then the 128-bit lanes (two rounds of shuffle_f32x4). Always
  // inlined, so that the rows stay in registers.
  [[gnu::always_inline]] static void Transpose(F r[kFloats]) {
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

  // QuantizeDynamicU8 (quantize_dynamic_u8_simd.h). Four vectors of int32 in [0, 255] as kBytes
  // bytes, in order: the saturating packs are exact but work per 128-bit lane (lane l: a, b, c, d's
  // dwords 4l..4l+3), so dword 4l + j goes to 4j + l.
  static I PackBytes(const I q[4]) {
    const I bytes = _mm512_packus_epi16(_mm512_packs_epi32(q[0], q[1]), _mm512_packs_epi32(q[2], q[3]));
    return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), bytes);
  }
  // The int32 lanes [0, n) of q, each in [0, 255], as n bytes at p (0 <= n <= kFloats).
  static void StoreBytesFirst(uint8_t* p, I q, int64_t n) { _mm512_mask_cvtusepi32_storeu_epi8(p, FirstLanes(n), q); }

  // The matrix products (int_conv_gemm.h): vpdpbusd adds 4 products of uint8 activations and int8
  // weights into an int32 lane, exact for any weights; the sums stay in registers over all of k.
  static constexpr bool kInt16Sums = false;
  static constexpr int kGemmVectors = 4;  // Gemm's tile: kRows rows x 4 vectors (64 pixels)
  // GemmT's tile: 4 blocks of 16 rows x 4 pixels (wider: GCC 12 spills); with fewer blocks (16 or 32
  // rows: ResNet-20's 3x3 layers) more pixels, so that 16 sums hide vpdpbusd's latency (with 4 the
  // chains of dependent vpdpbusd ran at about half its throughput).
  static constexpr int kGemmTBlocks = 4;
  static constexpr int GemmTPixels(int blocks) { return blocks == 1 ? 16 : blocks == 2 ? 8 : blocks == 3 ? 5 : 4; }
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

  // The fused quantization (int_conv_fused.h, QuantizeFixed). Whether any lane of u[0..3] has its
  // low 12 bits 0 (a tie).
  // (The masks are or-ed and tested in mask registers: GCC moved each to a general register first.)
  static bool AnyFixedTie(const I u[4]) {
    const I fraction = _mm512_set1_epi32(iconv::kFixedFraction);
    const __mmask16 t01 = _kor_mask16(_mm512_testn_epi32_mask(u[0], fraction), _mm512_testn_epi32_mask(u[1], fraction));
    const __mmask16 t23 = _kor_mask16(_mm512_testn_epi32_mask(u[2], fraction), _mm512_testn_epi32_mask(u[3], fraction));
    return _kortestz_mask16_u8(t01, t23) == 0;
  }
  // Bits 12..19 of each dword of u[0..3] (value 16k + i in dword i of u[k]) as kBytes bytes in
  // order: moved to byte k of dword i (shifts, byte and word blends), then each 128-bit lane's bytes
  // grouped by k and the lanes' groups put in order.
  static I PackFixedBytes(const I u[4]) {
    const I grouped = _mm512_shuffle_epi8(FixedDwords(u), _mm512_set4_epi32(0x0F0B0703, 0x0E0A0602, 0x0D090501, 0x0C080400));
    return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), grouped);
  }
  // Quarter k of v (bytes 16k .. 16k + 15) to to[k].
  static void StoreQuarters(uint8_t* const to[4], I v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(to[0]), _mm512_castsi512_si128(v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(to[1]), _mm512_extracti32x4_epi32(v, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(to[2]), _mm512_extracti32x4_epi32(v, 2));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(to[3]), _mm512_extracti32x4_epi32(v, 3));
  }
  // The first n bytes (n <= 16) of quarter k of v to to[k] (masked stores of each quarter moved to the low lane).
  static void StoreQuartersFirst(uint8_t* const to[4], I v, int64_t n) {
    const __mmask64 mask = (__mmask64{1} << n) - 1;
    _mm512_mask_storeu_epi8(to[0], mask, v);
    _mm512_mask_storeu_epi8(to[1], mask, _mm512_castsi128_si512(_mm512_extracti32x4_epi32(v, 1)));
    _mm512_mask_storeu_epi8(to[2], mask, _mm512_castsi128_si512(_mm512_extracti32x4_epi32(v, 2)));
    _mm512_mask_storeu_epi8(to[3], mask, _mm512_castsi128_si512(_mm512_extracti32x4_epi32(v, 3)));
  }
  // Bits 12..19 of dword i of u[k] as byte k of dword i.
  static I FixedDwords(const I u[4]) {
    const I b01 = _mm512_mask_blend_epi8(0x2222222222222222, _mm512_srli_epi32(u[0], 12), _mm512_srli_epi32(u[1], 4));
    const I b23 = _mm512_mask_blend_epi8(0x8888888888888888, _mm512_slli_epi32(u[2], 4), _mm512_slli_epi32(u[3], 12));
    return _mm512_mask_blend_epi16(0xAAAAAAAA, b01, b23);
  }

  // FinishTBytes (int_conv_finish.h): 4 x 4 dwords transposed in each 128-bit lane (dword i of v[k]
  // to dword k of v[i]), and 16 bytes from or to each of p[0..3] as the 128-bit lanes 0..3 of v.
  static void TransposeDwords4(I v[4]) {
    const I a = _mm512_unpacklo_epi32(v[0], v[1]), b = _mm512_unpacklo_epi32(v[2], v[3]);
    const I c = _mm512_unpackhi_epi32(v[0], v[1]), d = _mm512_unpackhi_epi32(v[2], v[3]);
    v[0] = _mm512_unpacklo_epi64(a, b);
    v[1] = _mm512_unpackhi_epi64(a, b);
    v[2] = _mm512_unpacklo_epi64(c, d);
    v[3] = _mm512_unpackhi_epi64(c, d);
  }
  static I LoadLanes(const uint8_t* const p[4]) {
    auto part = [](const uint8_t* q) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)); };
    const I low = _mm512_inserti32x4(_mm512_castsi128_si512(part(p[0])), part(p[1]), 1);
    return _mm512_inserti32x4(_mm512_inserti32x4(low, part(p[2]), 2), part(p[3]), 3);
  }
  static void StoreLanes(I v, uint8_t* const p[4]) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p[0]), _mm512_castsi512_si128(v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p[1]), _mm512_extracti32x4_epi32(v, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p[2]), _mm512_extracti32x4_epi32(v, 2));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p[3]), _mm512_extracti32x4_epi32(v, 3));
  }
  static void StoreLanesFirst(I v, uint8_t* const p[4], int64_t n) { StoreQuartersFirst(p, v, n); }  // (n <= 16)

  // LanesFused (int_conv_fused.h): cells of 4 pixels, the 16 channels' sums in int32 lanes.
  static constexpr int kLaneTaps = 4;
  // Bytes i of p where bit i of mask is set, v's elsewhere (nothing read there: p may point before X).
  static I MaskLoadBytes(I v, uint64_t mask, const uint8_t* p) { return _mm512_mask_loadu_epi8(v, mask, p); }
  // 16 x 16 dwords transposed (dword j of r[i] to dword i of r[j]): Transpose's moves, bits as they are.
  static void TransposeDwords16(I r[16]) {
    F f[16];
    for (int i = 0; i < 16; ++i) f[i] = _mm512_castsi512_ps(r[i]);
    Transpose(f);
    for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(f[i]);
  }
  static I InterleaveLo8(I a, I b) { return _mm512_unpacklo_epi8(a, b); }  // per 128-bit lane
  static I InterleaveHi8(I a, I b) { return _mm512_unpackhi_epi8(a, b); }
  template <int kLane>
  static __m128i Lane128(I v) {
    if constexpr (kLane == 0) {
      return _mm512_castsi512_si128(v);
    } else {
      return _mm512_extracti32x4_epi32(v, kLane);
    }
  }
  // The cell of the 4 pixels (16 bytes each) at p: the dwords of the 4 x 4 blocks of (pixel,
  // channel quad) transposed across the 128-bit lanes (lane l: channels 4l..4l+3 of pixels 0..3),
  // then each lane's 4 x 4 bytes (channel i's dword: its bytes of pixels 0..3).
  static I LaneCell(const uint8_t* p) {
    const I lanes = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const I bytes = _mm512_setr4_epi32(0x0C080400, 0x0D090501, 0x0E0A0602, 0x0F0B0703);
    return _mm512_shuffle_epi8(_mm512_permutexvar_epi32(lanes, Load(p)), bytes);
  }
  // A cell shifted down a byte: each channel's bytes of pixels 1..3, then 0.
  static I ShiftCellsByte(I v) { return _mm512_srli_epi32(v, 8); }
  // -z[i] in lane i of the sums.
  static I LaneSumsFrom(const int32_t* z) { return _mm512_sub_epi32(_mm512_setzero_si512(), Load(z)); }
  static void LaneInt32(I sums, I out[1]) { out[0] = sums; }
  // Lanes [0, lanes) of the 16 in y[0]: lane i to p[i * stride].
  static void ScatterLanes(float* p, int64_t stride, const F y[1], int64_t lanes) {
    const I index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                       _mm512_set1_epi32(static_cast<int32_t>(stride)));
    _mm512_mask_i32scatter_ps(p, FirstLanes(lanes), index, y[0], 4);
  }

  // DepthwiseFused (int_conv_fused.h): its blocks' tap sums, below.
  struct Fused;

 private:
  // Lanes [0, min(n, kFloats)), none for n <= 0.
  static __mmask16 FirstLanes(int64_t n) {
    return n >= kFloats ? static_cast<__mmask16>(0xFFFF) : n > 0 ? static_cast<__mmask16>((1u << n) - 1) : 0;
  }
};

// DepthwiseFused's block for AVX-512 VNNI: 64 columns as 4 phases, vector r holding columns
// p0 + 4i + r in lane i, so that each of its dwords is the 4 bytes of plane row ky at column
// 4i + r + 4j..: one vpdpbusd per tap group and phase, any int8 weights, both lists' sums from the
// same loads. The outputs of the kept columns are compressed into place.
struct Avx512::Fused {
  static constexpr int64_t kBlock = 64;
  static constexpr bool kTapGroups = true;
  static constexpr bool kQuantizeRows = false;  // BuildPlane
  static constexpr int kRowColumns = 1;

  struct Consts : iconv::FusedFinish<Avx512> {
    I z_e, z_o;                // -z_x * sum w of each list
    const int32_t *w_e, *w_o;  // the lists' tap groups, 4 int8 each
    Consts(const iconv::DepthwiseFused& d, int64_t i)
        : FusedFinish<Avx512>(d, i),
          z_e(_mm512_set1_epi32(-d.z_e[i])),
          z_o(_mm512_set1_epi32(d.post ? -d.z_o[i] : 0)),
          w_e(d.weights + i * 2 * d.groups),
          w_o(d.weights + (i * 2 + 1) * d.groups) {}
  };

  // Stride 2 (column p at byte 2p): vectors 2h + r hold columns p0 + 32h + 2i + r, from one load
  // each at 2 * (p0 + 32h) + 2r.
  template <bool kPost, bool kBias, int kGroups, int kStride>
  static void Block(const iconv::DepthwiseFused& d, const Consts& c, int64_t p0, float* out, int64_t first) {
    I e[4], o[4];  // the sums start at -z_x * sum w: the zero-point correction, done
    for (int r = 0; r < 4; ++r) {
      e[r] = c.z_e;
      o[r] = c.z_o;
    }
    const int64_t groups = kGroups > 0 ? kGroups : d.groups;
    const uint8_t* base = d.plane + kStride * p0;
    for (int64_t t = 0; t < groups; ++t) {
      const uint8_t* src = base + d.offsets[t];
      const I w_e = _mm512_set1_epi32(c.w_e[t]);
      const I w_o = kPost ? _mm512_set1_epi32(c.w_o[t]) : w_e;
      for (int r = 0; r < 4; ++r) {
        const I x = Load(src + (kStride == 1 ? r : 64 * (r / 2) + 2 * (r % 2)));
        e[r] = AddProducts(e[r], x, w_e);
        if (kPost) o[r] = AddProducts(o[r], x, w_o);
      }
    }
    F y[4];
    for (int r = 0; r < 4; ++r) y[r] = c.template Finish<kPost, kBias>(e[r], o[r]);
    // Phases to column order: u[k] lane 2i + a = y[a][8k + i], v[k] the same of y[2], y[3]; then
    // columns 16q + 4i + r = y[r][4q + i] from u[q / 2], v[q / 2].
    const I pair0 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const I pair1 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const I quad0 = _mm512_setr_epi32(0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
    const I quad1 = _mm512_setr_epi32(8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31);
    const F u0 = _mm512_permutex2var_ps(y[0], pair0, y[1]), u1 = _mm512_permutex2var_ps(y[0], pair1, y[1]);
    const F v0 = _mm512_permutex2var_ps(y[2], pair0, y[3]), v1 = _mm512_permutex2var_ps(y[2], pair1, y[3]);
    // (stride 2: u0, u1, v0, v1 are already columns 0-15, 16-31, 32-47, 48-63)
    const F columns[4] = {
        kStride == 1 ? _mm512_permutex2var_ps(u0, quad0, v0) : u0,
        kStride == 1 ? _mm512_permutex2var_ps(u0, quad1, v0) : u1,
        kStride == 1 ? _mm512_permutex2var_ps(u1, quad0, v1) : v0,
        kStride == 1 ? _mm512_permutex2var_ps(u1, quad1, v1) : v1,
    };
    // The kept columns of each 16, packed to the low lanes, to their outputs.
    for (int q = 0; q < 4; ++q) {
      const int64_t g = p0 / 8 + 2 * q;
      const auto keep = static_cast<__mmask16>(d.keep[g] | d.keep[g + 1] << 8);
      const int64_t start = d.starts[g], count = d.starts[g + 2] - start;
      _mm512_mask_storeu_ps(out + (start - first), static_cast<__mmask16>((1u << count) - 1),
                            _mm512_maskz_compress_ps(keep, columns[q]));
    }
  }
};

}  // namespace

extern const Kernels kAvx512Kernels = SimdKernels<Avx512>();

}  // namespace onnxq
