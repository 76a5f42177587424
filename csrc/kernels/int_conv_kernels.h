// The integer core of PostConv/IntConv's SIMD kernels, shared by int_conv_reference.cc (which
// packs the weights), int_conv_simd.cc (which lays out the activations and calls the kernels) and
// the kernels themselves: templates over an instruction set's traits (int_conv_gemm.h,
// int_conv_finish.h, int_conv_depthwise.h, int_conv_fused.h), compiled once per instruction set in
// kernels_avx2.cc and kernels_avx512.cc and called through their tables (kernels.h).
// Like quantize_dynamic_u8_kernels.h it holds no onnxruntime or standard-library templates and no
// inline functions with external linkage (an -mavx512f copy could be the one the linker keeps).
//
// The SIMD kernels compute a convolution as a matrix product per image, group and panel of
// output pixels: C[r][p] = sum_k A[r][k] * B[k][p], A the int8 weights (one row per output
// channel for IntConv; two for PostConv, w_even and w_odd), B the uint8 activations of each
// pixel's receptive field. Both are stored in blocks of 4 consecutive k, the unit that vpdpbusd
// sums and that two vpmaddubsw pairs cover:
//   A: a[((rb*k4 + i)*kRows + r)*4 + j] = A[rb*kRows + r][4*i + j]   (row blocks of kRows rows)
//   B: b[b_offsets[i] + 4*p + j]        = B[4*i + j][p]
// k runs over (quad of 4 channels, ky, kx), so a block of 4 k is one input pixel's 4 channels, and
// int_conv_simd.cc lays the padded input out by quads and stride phases: B is then that image
// itself, one offset per block of 4 k, with no im2col copy (some matrix columns fall on padding
// and are dropped). Integer sums are exact in any order, so every order of k gives the same C.
// The AVX2 kernels walk k in chunks of `chunk` blocks (a few quads times all taps), so that the
// part of A and of the image a chunk reads stays in the L1 cache while it serves every pixel.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/quantize_dynamic_u8_kernels.h"

namespace onnxq::iconv {

constexpr int64_t kRows = 4;    // rows of A per micro-kernel block
// A sum of products of uint8 activations with int8 weights is exact in int16 (vpaddw wraps, and
// only the final sum must fit) while the sum of the |w| it takes is at most this.
constexpr int32_t kInt16WeightBudget = 32767 / 255;  // 128
constexpr int64_t kPanel = 64;  // output pixels per panel (the widest micro-kernel tile)

// One product C = A * B over rows [0, rows) and pixels [0, pixels).
struct Gemm {
  const int8_t* a;     // A, rows / kRows blocks (see above); for `a_hi`, its low part
  const int8_t* a_hi;  // AVX2 with |A| > 8 only: A = 16 * a_hi + a, a in [-8, 7], a_hi in [-8, 8]
  int64_t rows;        // a multiple of kRows
  int64_t k4;          // K / 4 (K padded with zero weights)
  const uint8_t* b;
  const int64_t* b_offsets;  // [k4]: where each block of 4 k starts, in bytes from b
  int64_t pixels;            // a multiple of 16, at most kPanel
  int64_t chunk;             // blocks of 4 k per cache chunk (AVX2)
  const int32_t* runs;       // AVX2 without a_hi and not wide: [rows / kRows][k4], see Int16Runs
  bool wide;                 // AVX2: |A| <= 64, some > 8: every block widened at once (int_conv_gemm.h)
  int32_t* c;                // C[r][p] at c[r * kPanel + p]
  // Int32 sums only (VNNI; ignored by int16 sums): [rows], what row r's sums start at, -z_x * its sum of
  // weights, so that C holds the sums with the zero-point correction done (PanelOutput::started); or null.
  const int32_t* start;
};

// AVX2 sums vpmaddubsw's int16 pairs in int16 registers, exact while every lane's final sum fits
// (vpaddw wraps): it lies in [-255 * (its sum of negative |w|), 255 * (its sum of positive w)], so
// each of the two within kInt16WeightBudget (above) is enough. For A packed in `blocks` blocks of
// `block_rows` rows (k4 blocks of 4 k each, as above), runs[b * k4 + i] is how many blocks of k from
// block i the sums of row block b can take: every row's sums of positive w and of negative |w| over
// each of its two pairs (k = 4i + 0, 1 and 4i + 2, 3) stay <= 128. At least 8 where |w| <= 8.
void Int16Runs(const int8_t* a, int64_t blocks, int64_t k4, int64_t block_rows, int32_t* runs);

// The same product transposed in registers: rows of A in vector lanes, one pixel's 4 activations
// broadcast. Nothing is computed for columns that are dropped (the column padding of Gemm), so
// small images (7x7, 14x14) waste nothing. A is packed in blocks of kLanes rows:
//   a[((rb*k4 + i)*kLanes + r)*4 + j] = A[rb*kLanes + r][4*i + j]
// and pixel p's 4 activations of block i are at b[b_offsets[i] + pixel_offsets[p]] (adjacent pixels of an
// output row 4 bytes apart: the kernel's tiles take runs of them).
constexpr int64_t kLanes = 16;

struct GemmT {
  const int8_t* a;
  int64_t rows;  // a multiple of kLanes
  int64_t k4;
  const uint8_t* b;
  const int64_t* b_offsets;      // [k4]
  const int64_t* pixel_offsets;  // [pixels]
  int64_t pixels;
  int64_t chunk;                 // blocks of 4 k per cache chunk (AVX2)
  const int32_t* runs;           // AVX2, not wide: [rows / kLanes][k4], see Int16Runs
  bool wide;                     // AVX2: as Gemm::wide
  int32_t* c;  // by blocks of kLanes rows: C[r][p] at c[((r / kLanes) * pixels + p) * kLanes + r % kLanes]
};

// (AVX2: |A| <= 64 only, no split weights.)

// GemmT's epilogue (int_conv.h's float epilogue, Finish below, lane by lane): C in GemmT's blocks
// of kLanes rows, rows in the vector lanes, finished 16 pixels at a time and transposed in
// registers, so that each output channel's 16 pixels are one store. Rows as in A: IntConv one per
// output channel, PostConv 2*mm (w_even) and 2*mm + 1 (w_odd). The per-row tables are padded with
// zeros to a multiple of 2 * kLanes rows.
// With an Output (a residual, uint8 Y or the hard swish; then the clip bounds are the default ones) the
// finished floats of each block of channels go through the output step from a small tile in L1 into Y
// (the panel's channels staged whole, 64 KiB for 256 channels, left the cache first), Y's element of
// channel mm's pixel i at `at` + mm * stride + i; out is unused.
struct Output;

struct FinishT {
  const int32_t* c;      // GemmT::c
  int64_t pixels;        // GemmT::pixels
  int64_t channels;      // output channels
  bool post;
  const int32_t* z;      // [rows]: z_x * each row's sum of weights
  const float* factor;   // [rows]: c_e of the row's channel (PostConv's odd rows: c_o)
  const float* bias;     // [channels], or null
  float clip_lo, clip_hi;        // the clip bounds (Clip)
  float* out;            // channel mm's pixel i at out[mm * stride + i]
  int64_t stride;
  const Output* output;  // or null
  int64_t at;            // (with output)
  // Per-pixel steps (int_conv.h, x_steps = "pixel"; IntConv only): pixel i's z_x and s_x, z then holding each
  // row's sum of weights and factor its channel's weight scale: row r of pixel i is finished with z_x[i] * z[r]
  // and s_x[i] * factor[r]. Else null.
  const int32_t* z_pixels;
  const float* s_pixels;
};

// The epilogue's last steps (int_conv.h) where the op has a residual R or a uint8 Y: y, as Finish
// computes it without the clip, plus R's value (float R, or uint8 R dequantized), then the clip,
// the hard swish and the per-channel affine map (each where the op has it), then quantized to Y's uint8 (y_scale, y_zero_point as qdu8::Params), or stored as float. Element
// i of a run of Y is at index i of every pointer here (R has Y's shape). The SIMD kernels write
// their float y into scratch and call the table's `output` on each run of it (OutputKernel,
// int_conv_finish.h); the scalar reference calls OutputOne per element.
struct Output {
  const float* r;           // float R, or null
  const uint8_t* r8;        // uint8 R, or null
  int32_t r_zero_point;     // (uint8 R)
  float r_scale;
  float clip_lo, clip_hi;   // the clip bounds (attributes clip_min, clip_max)
  bool hardswish;           // the hard swish after the clip (attributes hardswish, hardswish_alpha, _beta)
  float hardswish_alpha, hardswish_beta;
  const float* post_scale;  // [M], or null: y * post_scale[m] + post_bias[m] after the clip and the hard swish
  const float* post_bias;   // [M] (with post_scale)
  int64_t pixels, channels; // (with post_scale) Y's element `at` is in channel (at / pixels) % channels
  bool quantize;            // Y uint8 (else float)
  qdu8::Params y_params;    // y_scale, -y_zp, 255 - y_zp, y_zp
  float* y;                 // float Y (quantize false)
  uint8_t* y8;              // uint8 Y (quantize true)
};

// A Gemm panel's float epilogue and output step in one pass (kernels.h's panel_output, with an Output):
// each output channel's y, finished from C (Finish without the clip: with an Output the bounds are the
// default ones, and the output step clips after R), goes through the output step in registers, never
// stored as floats. Lane by lane the same as FinishRun then OutputKernel on each run of kept columns
// (a 1x1 16->32 at 112x112 into uint8 spent more time storing, reloading and walking its staged floats
// than on the product). A run is consecutive matrix columns that are consecutive elements of Y.
struct PanelRun {
  int64_t column;  // the run's first column in C
  int64_t count;   // its columns, >= 1
  int64_t at;      // Y's element of its first column in output channel 0 of the panel's channels
};

struct PanelOutput {
  const Output* output;
  const int32_t* c;               // C: row r's column p at c[r * kPanel + p]
  int64_t channels;               // output channel i from row i (IntConv) or rows 2i, 2i + 1 (PostConv)
  bool post;
  const int32_t* row_sum;         // [rows]: each row's sum of weights
  int32_t z;                      // z_x
  const float *c_e, *c_o, *bias;  // [channels] each; bias may be null
  const PanelRun* runs;
  int64_t run_count;
  int64_t stride;                 // Y's elements from one output channel to the next (OH * OW)
  bool started;                   // C's sums started at -z_x * row_sum (Gemm::start): no correction left
};


// Depthwise convolutions (one input channel per group): one output channel's plane as direct sums
// over the kernel taps, 16 pixels at once, with the float epilogue (Finish) fused. The input
// channel is padded and in stride-phase planes (int_conv_simd.cc): output pixel (oy, ox) is the
// matrix column p = oy * cols + ox, and tap t of list l adds weights[l][t] * plane[offsets[l][t] + p];
// columns with p % cols >= ow are dropped. List 0 holds w (IntConv) or w_even, list 1 w_odd.
struct Depthwise {
  const uint8_t* plane;  // readable 16 bytes past the last column's taps
  int64_t cols, span;    // columns per output row; matrix columns: (OH - 1) * cols + OW
  int64_t ow;
  const int64_t* offsets[2];
  const int32_t* weights[2];
  int64_t taps[2];     // list 1 is empty for IntConv
  bool narrow[2];      // sum |w| <= kInt16WeightBudget: the sums run in int16
  bool post;
  int32_t z_e, z_o;    // z_x * sum of each list's weights
  float c_e, c_o;
  const float* bias;   // may be null
  float clip_lo, clip_hi;      // the clip bounds (Clip)
  float* out;          // OH * OW outputs
};


// AVX2's DepthwiseFused sums one vpmaddubsw word per pair of horizontally adjacent taps of one list,
// and only the pairs that hold a nonzero weight: a POST code falls in one list (w_even or w_odd), so
// a 3x3 kernel's two lists of 6 dense pairs (taps 0-1 and 2 of each row) hold about 7 nonzero ones
// together, which halves PostConv's sums; IntConv loses only its zero pairs. Pair i adds, for
// matrix column p, plane[offset + sw*p] * w0 + plane[offset + sw*p + 1] * w1 (w1 = 0 past kw).
struct FusedPair {
  int64_t offset;   // the first tap's offset in the plane (as DepthwiseFused::offsets)
  int32_t weights;  // w0 and w1 as the bytes of an int16, repeated in both halves (one vpbroadcastd)
  int32_t unused;
};

// Where the depthwise kernels that quantize X themselves (DepthwiseFused, LanesFused) place it in the
// plane they pad: X's h x w at padded rows pt.., columns pl.. of hp x wp, the padding the byte z (X's
// zero point), strides sh, sw.
struct PaddedPlane {
  int64_t h, w, pt, pl, hp, wp;
  int64_t sh, sw;
  int32_t z;
};

// Depthwise convolutions with unit horizontal dilation and a horizontal stride sw of 1 or 2,
// straight from the float input (int_conv_fused.h): per input channel, X quantized
// (qdu8::QuantizeOne's values) and padded (z_x around X) into sh row phases (padded row y in phase
// y % sh, row y / sh), each hq x wp bytes (wp: the padded width rounded up to sw; AVX2: to 8 * sw), then each of its
// output channels as multiply-adds of horizontally adjacent taps, whose bytes lie side by side in
// the plane: 4 taps per vpdpbusd dword (AVX-512 VNNI, any int8 weights), 2 per vpmaddubsw word with
// int16 sums (AVX2, every list narrow, only the nonzero pairs: FusedPair). Matrix column
// p = oy * (wp / sw) + ox is output pixel (oy, ox) when ox < ow (else dropped); the tap group t of
// kernel row ky, taps kx = G*j .. G*j + G-1 (G = 4, 0 weights past kw), reads
// plane[offsets[t] + sw * p], offsets[t] = (ky*dh % sh) * hq*wp + (ky*dh / sh) * wp + G*j (a FusedPair
// starting at tap kx likewise, + kx).
struct DepthwiseFused : PaddedPlane {
  const float* x;                 // the input channel, h x w (null for uint8 X: then bytes holds it as given)
  int64_t readable;               // floats that may be read from x (to the end of X)
  int64_t hq;                     // rows per phase: ceil(hp / sh)
  float scale, inverse, lo, hi;   // quantization (qdu8::Params), inverse = 1 / scale or 0 (divide); zero point z
  const uint8_t* bytes;           // the channel quantized (QuantizeFused), or uint8 X as given, h x w
  uint8_t* plane;                 // scratch: sh*hq*wp + kFusedSlack bytes
  bool fresh;                     // plane holds no padding yet (else: from an earlier call, same z)
  int64_t span;                   // matrix columns: (oh - 1) * wp / sw + ow
  int64_t pixels;                 // outputs per output channel: oh * ow
  const uint8_t* keep;            // bit j of keep[i]: column 8*i + j is an output (to the last block's end;
                                  // AVX2's rows are whole groups of 8 columns, its outputs first)
  const int64_t* starts;          // starts[i]: outputs before column 8*i
  int64_t groups;                 // tap groups: kh * ceil(kw / G)
  const int64_t* offsets;         // [groups]
  int64_t outputs;                // output channels of this input channel
  const int32_t* weights;         // AVX-512: [outputs][2][groups]: list 0 (w / w_even), list 1 (w_odd), 4 int8
                                  // per group
  const FusedPair* pairs;         // AVX2 (instead of groups, offsets, weights): output channel i's
  const int64_t* pair_start;      // list l at pairs[pair_start[2i + l] .. pair_start[2i + l + 1])
  const int32_t *z_e, *z_o;       // [outputs]: z_x * sum of each list's weights
  const float *c_e, *c_o, *bias;  // [outputs]; bias may be null
  float clip_lo, clip_hi;                 // the clip bounds (Clip)
  bool post;
  float* out;                     // output channel i's plane at out + i * pixels (without an Output)
  const Output* output;           // or null; else (a residual, uint8 Y or the hard swish; clip bounds
  int64_t at;                     // the default ones) output channel i's y through the output step into
                                  // Y's elements from at + i * pixels
};

// Bytes after the scratch data that the kernels may read or write.
constexpr int64_t kFusedSlack = 256;  // (stride 2 reads 2 bytes per column)

// DepthwiseFused's quantization (kernels.h's quantize_fused): dst[i] = QuantizeOne(d.x[i]) for
// i < n, with d's parameters (scale, inverse, lo, hi, z); writes up to 64 bytes past n. Run over
// several channels at once.

// Depthwise convolutions with one output per input channel on small images, 16 channels at once
// in the vector lanes: no per-channel cost, which small images do not repay. The input block is
// x[y][x][16] (the padded image, 16 channels per pixel); output pixel (oy, ox) of lane i is
// sum over taps t of w[t][i] * x[oy*sh*wp + ox*sw + offsets[t] / 16][i], every tap dense (POST's
// codes as w_even or w_odd, the other one 0), every lane's sum |w| <= kInt16WeightBudget (int16).
// The epilogue of the kernels with 16 channels in the lanes (DepthwiseLanes, LanesFused): per
// lane, y = sums' float value * c + bias, clipped, written to that channel's output plane.
struct LaneOutput {
  bool post;
  const int32_t *z_e, *z_o;  // [16] each: z_x * sum of each lane's weights
  const float *c_e, *c_o;    // [16] each
  const float* bias;         // [16], or null
  float clip_lo, clip_hi;    // the clip bounds (Clip)
  int64_t oh, ow;
  float* out;                // lane i's output plane at out + i * oh * ow (without an Output)
  const Output* output;      // or null; else (a residual, uint8 Y or the hard swish; clip bounds the
  int64_t at;                // default ones) lane i's y through the output step into Y's elements
                             // from at + i * oh * ow
};

struct DepthwiseLanes : LaneOutput {
  const uint8_t* x;          // [hp][wp][16]
  int64_t wp, sh, sw;        // padded width, strides
  const int64_t* offsets;    // [taps]: (ky*dh*wp + kx*dw) * 16
  int64_t taps;
  const int16_t* w_e;        // [taps][16]: w (IntConv) or w_even
  const int16_t* w_o;        // [taps][16]: w_odd (PostConv only)
  int64_t lanes;             // the lanes that are channels (the last block may have fewer than 16)
};


// Depthwise convolutions with one output per input channel on small images, straight from the
// float input like DepthwiseFused (unit horizontal dilation, horizontal stride 1 or 2), 16
// channels in the vector lanes: no per-channel cost. The block's channels, quantized
// (QuantizeFused's bytes, channel planes of h x w), are transposed into a padded image of
// 16-byte pixels (z around X and for lanes past `lanes`), then into cells of G horizontally
// adjacent pixels: cell (y, c) holds, for each channel i, the bytes of padded pixels (y, sw*c + j),
// j < G, side by side in lane i, so that one instruction adds G taps of 16 channels: AVX-512 VNNI
// G = 4 (vpdpbusd, int32 lanes, any int8 weights), AVX2 G = 2 (vpmaddubsw, int16 lanes, every list
// narrow). Output pixel (oy, ox) sums tap group t (kernel row ky, taps G*g..G*g+G-1) from cell
// (sh*oy + ky*dh, ox + G*g/sw).
// Cells start every `step` columns: sw, or 2 at stride 1 for VNNI kernels at most 3 wide (LanesStep):
// then cell (y, c) serves outputs 2c and 2c + 1, the odd one from the cell shifted down a byte
// (taps 1..3 of the 4 pixels, weights unchanged), which halves the cells built and loaded.
struct LanesFused : LaneOutput, PaddedPlane {
  const uint8_t* bytes;      // [16][h * w], readable 64 bytes past the end
  int64_t lanes;             // channels in this block (<= 16); later planes are never read
  int64_t step;              // columns between cells (LanesStep)
  uint8_t* scratch;          // LanesScratch(...) bytes
  int64_t groups;            // kh * ceil(kw / G)
  const int64_t* offsets;    // [groups]: (ky*dh) * cells per row + G*g / step, in cells
  const void* weights;        // [2][groups][16 lanes of G int8]: list 0 (w / w_even), list 1 (w_odd);
                             // VNNI: PackedWeights::lane_quads, AVX2: lane_pairs
};

namespace {
// LanesFused's columns between cells (G: the kernels' taps per cell), its cells per row, and the
// scratch it needs.
inline int64_t LanesStep(int64_t g, int64_t sw, int64_t kw) { return g == 4 && sw == 1 && kw <= 3 ? 2 : sw; }
inline int64_t LanesCells(int64_t wp, int64_t step) { return (wp + step - 1) / step; }
inline int64_t LanesScratch(int64_t hp, int64_t wp, int64_t step) {
  return hp * (wp + 4) * 16 + hp * LanesCells(wp, step) * 64 + 128;
}
}  // namespace


namespace {

// The clip of int_conv.h's epilogue (attributes clip_min, clip_max: lo <= hi, neither NaN), as the
// SIMD kernels compute it: max_ps(lo, y) is exactly `y < lo ? lo : y`, min_ps(hi, y) exactly
// `y > hi ? hi : y`. A NaN y stays NaN, and with the default bounds (-inf, +inf) every y, -0
// included, is left as it is.
inline float Clip(float y, float lo, float hi) {
  y = y < lo ? lo : y;
  return y > hi ? hi : y;
}

// The float epilogue of int_conv.h, the one definition every kernel uses: the same float32
// operations in the same order, then the clip. acc_o is unused for IntConv (post = false); bias
// may be null.
inline float Finish(bool post, int32_t acc_e, int32_t acc_o, float c_e, float c_o, const float* bias, float lo,
                    float hi) {
  float y;
  if (post) {
    const float even = static_cast<float>(acc_e) * c_e;
    const float odd = static_cast<float>(acc_o) * c_o;
    y = even + odd;
  } else {
    y = static_cast<float>(acc_e) * c_e;
  }
  return Clip(bias != nullptr ? y + *bias : y, lo, hi);
}

// The hard swish of int_conv.h's epilogue: y times its hard sigmoid, in this order of float32 steps.
inline float HardSwish(float y, float alpha, float beta) {
  float t = y * alpha;
  t = t + beta;
  return y * Clip(t, 0.0f, 1.0f);
}

// Output (above) of element `at`, whose unclipped y is given: the residual, the clip, the hard
// swish, the per-channel affine map, the output's type. The one definition of these steps; OutputKernel equals it lane by lane.
inline void OutputOne(const Output& o, float y, int64_t at) {
  if (o.r != nullptr) y = y + o.r[at];
  if (o.r8 != nullptr) y = y + static_cast<float>(static_cast<int32_t>(o.r8[at]) - o.r_zero_point) * o.r_scale;
  y = Clip(y, o.clip_lo, o.clip_hi);
  if (o.hardswish) y = HardSwish(y, o.hardswish_alpha, o.hardswish_beta);
  if (o.post_scale != nullptr) {
    const int64_t m = at / o.pixels % o.channels;
    y = y * o.post_scale[m];
    y = y + o.post_bias[m];
  }
  if (o.quantize) {
    o.y8[at] = qdu8::QuantizeOne(y, o.y_params);
  } else {
    o.y[at] = y;
  }
}

// Fused quantization without a division per value: one fused multiply-add u = x * inverse +
// (z + 3072.5) rounds x * inverse (unrounded) to a multiple of 2^-12 (the float ulp in [2048, 4096)),
// plus z + 1/2; clamped to [3072.5, 3327.5] (lo = -z and hi = 255 - z, shifted likewise), u =
// 3072 + (v + 1/2) with v the clamped fixed-point quotient plus z. Its bits are then a fixed-point
// number: bits(u) >> 12 = 0x45400 + round half up of v (so the low byte is the result, in [0, 255]),
// and the low 12 bits are 0 exactly when v is a half-integer. It rounds to the same integer as
// QuantizeOne's correctly rounded quotient unless v is a half-integer. For scales in [2^-100, 2^100]
// (inverse normal), |x * inverse - fl(x / scale)| <= 2 * 2^-24 * |x / scale| (the inverse rounded
// once, the quotient once; the product is exact inside the multiply-add); where |x / scale| > 512
// both clamp to the same bound, elsewhere the error is at most 2^-14 (and u stays in [2048, 4096)),
// and clamping never widens it. So a half-integer h between the two clamped values (or equal to
// QuantizeOne's) lies within 2^-14 < 2^-13 of x * inverse + z, which then rounds to v = h: the
// kernels recompute such blocks by division (about 1 value in 4000 is near enough to a tie), and
// round every other v half up (it is no tie). NaN: maxps(u, lower bound) is the bound, as in QuantizeOne.
constexpr float kFixedBias = 3072.5f;     // 1.5 * 2^11 + 1/2
constexpr int32_t kFixedFraction = 4095;  // the low 12 bits of bits(u)
inline float FixedMagic(int32_t z) { return kFixedBias + static_cast<float>(z); }

// 1 / scale where the bound above holds, else 0 (always divide).
inline float FusedInverse(float scale) {
  return scale >= 0x1p-100f && scale <= 0x1p100f ? 1.0f / scale : 0.0f;
}

// The fused quantization's parameters (DepthwiseFused's scale, inverse, lo, hi, z) for QuantizeOne's `p`:
// what quantize_fused and the output step quantize with.
inline DepthwiseFused FixedQuantization(const qdu8::Params& p) {
  DepthwiseFused q{};
  q.scale = p.scale;
  q.inverse = FusedInverse(p.scale);
  q.lo = p.lo;
  q.hi = p.hi;
  q.z = p.zero_point;
  return q;
}

}  // namespace

// FinishPixels (kernels.h's finish_pixels; int_conv_finish.h): IntConv's Finish with per-pixel steps
// (int_conv.h, x_steps = "pixel") over a run of n >= 1 pixels of one output channel: out[i] from the
// raw sum e[i] minus z[i] * row_sum (pixel i's z_x times the channel's sum of weights), times
// s[i] * scale (pixel i's s_x times the channel's weight scale, one float32 multiply), plus *bias
// (bias may be null), clipped to [lo, hi]. out must not overlap e.

// FinishRun (kernels.h's finish_run; int_conv_finish.h): Finish over a run of n >= 1 pixels of one
// output channel, out[i] from the raw sums e[i] (and o[i] for PostConv; o null for IntConv) minus
// the zero-point corrections z_e = z_x * sum w_even (z_o likewise); bias may be null. out must not
// overlap e or o.

}  // namespace onnxq::iconv
