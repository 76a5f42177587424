// The parts of PostConv/IntConv shared by int_conv.cc (the onnxruntime op), int_conv_reference.cc
// (W decoded and prepared, the scalar reference kernel) and int_conv_simd.cc (the SIMD kernels'
// driver). Only these files include it: none is compiled with -mavx2 / -mavx512f.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "cpu.h"
#include "onnxruntime_cxx_api.h"

namespace onnxq::iconv {

struct Output;  // int_conv_kernels.h

// A malformed input or attribute: onnxruntime reports it as ORT_INVALID_ARGUMENT.
struct InvalidArgument : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Above this, sum_k x_q * q could overflow int32 (255 * 128 * 65536 < 2^31).
constexpr int64_t kMaxK = 65536;

// At most this many pixels in the padded input, and values in all of it (N*C*H'*W'), so that no size
// computed from them overflows int64.
constexpr int64_t kMaxPadded = int64_t{1} << 40;

inline int64_t RoundUp(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// The sizes of one call.
struct Geometry {
  int64_t n, c, h, w;      // X
  int64_t m, group;        // output channels, groups
  int64_t cg, mg;          // input and output channels per group
  int64_t kh, kw, sh, sw, dh, dw, pt, pl;
  int64_t oh, ow;          // Y's spatial size
  int64_t k;               // codes per output channel: cg * kh * kw
  int64_t pixels() const { return oh * ow; }
};

// How the SIMD kernels run a convolution.
enum class Mode {
  kQuad,       // matrix product, k over (c4, ky, kx, j), channel c = 4*c4 + j padded to whole quads:
               // 4 consecutive k are 4 channels of one input pixel, and B is the padded input
               // itself (no im2col). Even 2 or 3 channels per group (the stem's RGB) run faster
               // padded to quads than through a byte-wise im2col.
  kDepthwise,  // one input channel per group: a direct sum over the kernel taps, 16 pixels at once
               // (Depthwise), or 16 channels at once for rows under 16 pixels (DepthwiseLanes)
};

// A convolution of one input channel into many (group 1, C 1, kh >= 2) runs as kQuad over quads of
// 4 consecutive kernel rows instead of 4 channels (PackedWeights::tap_quads): 1-D convolutions over H
// (kw 1, e.g. CREPE's first layer, kernel 512x1 stride 4) and image models' first layers (kw > 1:
// MobileNetV2's 3x3 at 28x28, the ViT's 4x4 stride-4 patches). As kDepthwise its vpdpbusd quads held
// horizontal taps, 1 of 4 of them real with kw 1, and as a channel quad 3 of 4 channels would be
// padding. It is the convolution TapQuadGeometry gives (below): channel j of its input is X's padded
// plane moved up by j*dh rows, its kernel ceil(kh/4) rows at dilation 4*dh, tap (j, ky', kx) the
// original tap (ky = 4*ky' + j, kx) (weight 0 past kh). The same sums, so the same Y bit for bit.
// Measured (tools/profile_ops.py's per-node times, one thread, batch 8, the old and new kernels'
// sessions interleaved in one process): the ViT's patch conv 85 -> 34 us (VNNI), 94.5 -> 42 (AVX2);
// MobileNetV2's first layer 232 -> 109 us with AVX2, about the same (57 -> 55) with VNNI.
bool UsesTapQuads(const Geometry& g, Isa isa);

// The convolution that a tap-quad one (UsesTapQuads) runs as, X's plane padded to hp rows in all
// (pad_top + H + pad_bottom): 4 channels of TapQuadRows(...) rows, no vertical padding, the same
// OH x OW; the horizontal padding as it was.
Geometry TapQuadGeometry(const Geometry& g);
// Rows of each channel of TapQuadGeometry's input: (OH - 1) * sh + (ceil(kh/4) - 1) * 4*dh + 1.
int64_t TapQuadRows(const Geometry& g);

// W decoded for one K: the codes (scalar reference), or the operands of the SIMD kernels.
struct PackedWeights {
  int64_t k = -1;             // the K it was prepared for
  std::vector<int8_t> codes;  // [M][K], the codes q in ONNX order (scalar kernel only)
  bool tap_quads = false;     // kQuad for TapQuadGeometry (UsesTapQuads): c4 1, k4 ceil(kh/4)*kw

  Mode mode = Mode::kQuad;
  // kQuad (int_conv_kernels.h). Rows: IntConv one per output channel; PostConv two,
  // 2*mm (w_even) and 2*mm + 1 (w_odd).
  int64_t c4 = 0, rows = 0, rows_pad = 0, k4 = 0;
  std::vector<int8_t> a, a_hi;   // [group][rows_pad / kRows][k4][kRows][4]; a_hi: AVX2 split
  std::vector<int32_t> row_sum;  // [group][rows_pad]: sum of each row's weights
  // The same rows for GemmT: [group][rows16 / kLanes][k4][kLanes][4] (empty for split weights).
  int64_t rows16 = 0;
  std::vector<int8_t> a16;
  // AVX2 with |A| <= 8: how many blocks of 4 k from each block on the int16 sums of a row block
  // can take (int_conv_kernels.h, Int16Runs), [group][row blocks][k4] for a and for a16.
  std::vector<int32_t> runs, runs16;
  // AVX2 with |A| <= 64 and some |w| > 8: every block widened at once (Gemm::wide; no runs).
  bool wide = false;
  // kDepthwise: the nonzero weights of each output channel as lists of (tap ky*kw + kx, weight);
  // list 2m holds w (IntConv) or w_even (PostConv), list 2m + 1 w_odd.
  std::vector<int64_t> list_start;  // [2M + 1]
  std::vector<int32_t> taps, weights;
  std::vector<int32_t> list_sum;      // [2M]: sum of each list's weights
  std::vector<uint8_t> list_narrow;   // [2M]: the list's sums fit int16 (int_conv_kernels.h)
  // The same weights for DepthwiseLanes (one output per input channel, every list narrow; else
  // empty): [M / 16 rounded up][2][kh*kw][16], list 0 then list 1, 0 for channels past M.
  std::vector<int16_t> lane_weights;
  // The same weights dense for DepthwiseFused (int_conv_kernels.h): [M][2][kh][ceil(kw / G)],
  // G = 4 taps per int32 (quads: one int8 per byte, VNNI) or G = 2 per int16 (pairs: AVX2, only
  // where every list is narrow, else empty), 0 for taps past kw.
  std::vector<int32_t> quads, pairs;
  // AVX2's DepthwiseFused (int_conv_kernels.h, FusedPair), where every list is narrow: the nonzero
  // pairs of horizontally adjacent taps of each list, list l of channel m at [pair_start[2m + l],
  // pair_start[2m + l + 1]): the first tap (ky*kw + kx), and its and the next tap's int8 weights
  // (0 past kw) as FusedPair::weights.
  std::vector<int64_t> pair_start;  // [2M + 1]
  std::vector<int32_t> pair_tap, pair_weights;
  // quads and pairs with 16 channels in the lanes for LanesFused (one output per input channel;
  // else empty): [M / 16 rounded up][2][kh][ceil(kw / G)][16], 0 for channels past M.
  std::vector<int32_t> lane_quads;
  std::vector<int16_t> lane_pairs;
};

// Whether the SIMD kernels run this depthwise convolution straight from the float input
// (DepthwiseFused: unit horizontal dilation, horizontal stride 1 or 2; AVX2 needs narrow lists).
// Then SimdArgs::x and the quantization parameters replace xq.
bool UsesFusedDepthwise(const Geometry& g, const PackedWeights& pw, Isa isa);

// Decode and check W's codes (M rows of row_bytes) for the K of g, and lay them out for the kernel
// `isa`; throws InvalidArgument for a PostConv code out of range.
std::shared_ptr<const PackedWeights> Prepare(const Geometry& g, const uint8_t* w, int64_t row_bytes, int64_t bits,
                                             bool post, Isa isa);

// The scalar reference kernel: int_conv.h's definition as direct loops over X quantized (xq, N C H W).
// Y to y (float, clipped to clip_lo, clip_hi), or with `output` (a residual or uint8 Y) each
// unclipped y through OutputOne (int_conv_kernels.h), which clips with its own bounds; y unused.
void ReferenceConv(const Geometry& g, const PackedWeights& pw, bool post, int64_t bits, const uint8_t* xq, int32_t z,
                   const float* c_e, const float* c_o, const float* bias, float clip_lo, float clip_hi, float* y,
                   const Output* output);

// The scalar reference with per-pixel steps (int_conv.h, x_steps = "pixel"; IntConv, 1x1, strides 1,
// no pads, group 1): pixel i = n * H*W + h * W + w uses z[i] and the factor s[i] * scale[m]. Y as
// ReferenceConv writes it.
void ReferencePixels(const Geometry& g, const PackedWeights& pw, const uint8_t* xq, const int32_t* z, const float* s,
                     const float* scale, const float* bias, float clip_lo, float clip_hi, float* y,
                     const Output* output);

// The per-channel tables a call of the SIMD kernels lays out from z_x, the factors and the bias (GemmT's
// FinishT rows, the lane kernels' per-lane constants), kept by a node's plan (int_conv.cc) where all of
// them are constant: made by the first call, read by the later ones. At batch 1 laying them out again at
// every call (a loop over up to 384 channels per node) cost about 3% of MobileNetV2's int model.
struct CallTables {
  // One kernel family's tables: its zero-point terms and float factors.
  struct Kept {
    std::atomic<bool> ready{false};  // set once z and factors hold the tables; never changed after
    std::vector<int32_t> z;
    std::vector<float> factors;

    // Keeps a call's freshly laid out tables unless another call kept its own first (they are equal).
    void Keep(std::mutex& mutex, const std::vector<int32_t>& made_z, const std::vector<float>& made_factors) {
      std::lock_guard<std::mutex> lock(mutex);
      if (ready.load(std::memory_order_relaxed)) return;
      z = made_z;
      factors = made_factors;
      ready.store(true, std::memory_order_release);
    }
  };

  std::mutex mutex;  // guards the writes
  Kept t;            // GemmT's FinishT rows
  Kept lane;         // the lane kernels' per-lane constants
};

// One call of the SIMD kernels (AVX2 or AVX-512): X quantized, the float factors, Y.
struct SimdArgs {
  const Geometry* g;
  const PackedWeights* pw;
  Isa isa;
  bool post;
  uint8_t z;                      // z_x
  const uint8_t* xq;              // X quantized, N C H W (null for UsesFusedDepthwise from float X;
                                  // uint8 X: X itself, which every kernel reads as it is)
  const float* x;                 // float X (UsesFusedDepthwise; else null), quantized with x_scale, x_lo, x_hi, z as
  float x_scale, x_lo, x_hi;      // qdu8::Params scale, lo, hi
  const float *c_e, *c_o, *bias;  // [M] each; bias may be null. Per-pixel steps: c_e is scale[m] itself
  const int32_t* z_pixels;        // per-pixel steps (int_conv.h, x_steps = "pixel"): each pixel's z_x and
  const float* s_pixels;          // s_x, [N * H * W] (IntConv, 1x1, strides 1, no pads, group 1); else null
  float clip_lo, clip_hi;         // the clip bounds (attributes clip_min, clip_max)
  float* y;                       // Y, N M OH OW (float Y without a residual)
  const Output* output;           // else (a residual, or uint8 Y): the kernels' float y, unclipped
                                  // (clip_lo, clip_hi are -inf, +inf), goes through scratch to this
  int64_t pad_bottom, pad_right;
  CallTables* tables = nullptr;   // where z_x, c_e, c_o and bias are the same at every call of the node: its
                                  // tables kept (else null: laid out at every call)
};

void SimdConv(const SimdArgs& args, Ort::KernelContext& context);

}  // namespace onnxq::iconv
