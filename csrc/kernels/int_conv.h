// PostConv and IntConv: 2-D convolutions that run on integers inside: uint8 activations times
// small signed integer weights, accumulated in int32; Y float32. PostConvQ and IntConvQ: the same
// ops with a uint8 Y (the quantization step below), so that data can stay uint8 from one
// convolution to the next. This comment is the definition of the four ops; the scalar reference
// kernel (int_conv_reference.cc, ReferenceConv, with OutputOne) implements it in direct loops, and
// every SIMD kernel equals it bit for bit.
//
// Why two names per op: onnxruntime infers a custom op's output type from its kernel definitions'
// input types (onnxruntime/core/session/custom_ops.cc, InferOutputTypes: the first definition
// whose type constraints match the node's present inputs), never from which optional inputs a node
// has, and an output of undefined type takes the type of the one input of undefined type. y_scale
// decides Y's type, not X's type, so uint8 Y has its own op names. X and R each take float32 or
// uint8: register.cc registers every name once per pair of their types, which onnxruntime merges
// into one schema (any other type is an error when the session loads).
//
// Inputs (all four ops; 3..14 optional, an empty name means absent)
//   0 X        float32 or uint8 (N, C, H, W). uint8: X is x_q itself (below), and x_scale and
//              x_zero_point are required.
//   1 W        uint8 (M, row_bytes): output channel m's K = C/group*kh*kw codes, in the row-major
//              (c, ky, kx) order of the ONNX Conv weight W[m]. bits <= 4: two per byte, code 2i in
//              the low nibble and 2i+1 in the high nibble, each a 4-bit two's-complement value,
//              row_bytes = ceil(K/2) (an odd K leaves the last high nibble unused). bits >= 5
//              (IntConv only): one two's-complement int8 per byte, row_bytes = K.
//   2 scale    float32 (M,): weight scale per output channel.
//   3 B        float32 (M,), optional (an empty name means absent).
//   4 x_scale  float32, 1 element (one step for the batch) or N elements of any shape, e.g. (N, 1)
//              (one step per sample: ASQ's adaptive steps); 5 x_zero_point uint8, 1 element.
//              Optional, both or neither; every step must be positive and finite.
//   6 y_scale  float32, 1 element, positive and finite; 7 y_zero_point uint8, 1 element: Y's
//              quantization. Required by PostConvQ/IntConvQ (both), an error for PostConv/IntConv.
//   8 R        float32 or uint8, exactly Y's shape (N, M, OH, OW): the residual, added before the
//              clip (a Conv -> Add(skip) -> Relu fused). uint8 R needs 9 r_scale float32, 1 element
//              or N > 1 elements (one step per sample: R written by an op with ASQ's steps, below),
//              positive and finite, and 10 r_zero_point uint8, 1 element; float R takes neither.
//  11 post_scale float32 (M,) and 12 post_bias float32 (M,), both or neither: a per-channel affine
//              map after the clip and the hard swish (a Conv -> Relu -> BatchNormalization fused,
//              the BatchNormalization in inference form).
//  13 asq_weight float32 (M,) and 14 asq_log float32, 3 elements (b, log_min, log_max; finite,
//              log_min <= log_max), both or neither; PostConvQ/IntConvQ only, and then output 1 is
//              required: Y is quantized with a step per sample, ASQ's adapter (onnxq/calibrate/asq.py)
//              computed from the op's own y (below).
// Output: Y float32 (PostConv, IntConv) or uint8 (PostConvQ, IntConvQ), (N, M, OH, OW), OH = (H + pad_top + pad_bottom - (dh*(kh-1)+1)) / sh + 1 (and
// likewise OW), which must be >= 1. Output 1 (optional; with asq_weight): Y's steps, float32 (N,).
// Attributes: bits (required), kernel_shape (required, [kh, kw]), strides [sh, sw] (1, 1),
// pads [top, left, bottom, right] (0, 0, 0, 0), dilations [dh, dw] (1, 1), group (1; depthwise:
// group = C), kernel (0: the fastest this CPU runs, 1 scalar, 2 AVX2, 3 AVX-512 VNNI; an error
// when this CPU lacks it), clip_min and clip_max (floats, -inf and +inf: the clip below, which fuses
// a following Relu (0, +inf) or Clip; an error when either is NaN or clip_min > clip_max), hardswish
// (int, 0: 1 applies the hard swish below after the clip, which fuses a following HardSwish, or a
// HardSigmoid and the Mul of its input by it), hardswish_alpha and hardswish_beta (floats, 1/6 and
// 1/2 as in ONNX HardSwish; finite; HardSigmoid's own when it is one that was fused), x_steps
// (string, "tensor": "pixel" gives every input pixel its own dynamic step, below). C and M
// must be divisible by group; K must be <= 65536 (so that no int32 sum can overflow); the padded
// input may have at most 2^40 pixels (H' = H + pad_top + pad_bottom times W') and 2^40 values
// (N*C*H'*W'). Any of N, C, M, H, W may be 0.
//
// Activation quantization, once per call over the whole X (uint8 X: none, x_q = X, with s_x, z_x
// the given x_scale (one, or one per sample) and x_zero_point):
//   with x_scale/x_zero_point: s_x, z_x as given; without: s_x, z_x as ONNX DynamicQuantizeLinear
//   (= the QuantizeDynamicU8 op) computes them from X's range. With N steps, sample n uses its
//   own s_x = x_scale[n] here and in the factors c below, exactly as if it ran alone. Then
//   x_q = clamp(round_half_even(x / s_x) + z_x, 0, 255) (a NaN gives 0), exactly the
//   QuantizeDynamicU8 kernels. Padded positions hold z_x, so they contribute exactly 0 below.
// Per-pixel steps (attribute x_steps = "pixel"; "tensor", the default, is the above): IntConv and
//   IntConvQ with float X and without x_scale/x_zero_point, a 1x1 kernel, strides 1, no pads and
//   group 1 (anything else is an error). Each input pixel (n, :, h, w), its C values, gets its own
//   s_x, z_x, as DynamicQuantizeLinear computes them from that pixel's range alone (0 included; NaN
//   values skipped by the min/max, as over the whole X), and its values are quantized with them as
//   above. Output pixel (n, :, h, w) then uses its input pixel's s_x and z_x in everything below:
//   acc = sum_k x_q*q - z_x[n,h,w] * sum_k q and c[m] = s_x[n,h,w] * scale[m] (float32, per pixel
//   and channel). So a Gemm written as a 1x1 convolution with its rows as pixels (onnxq/rewrite/
//   gemm.py) quantizes each row (token) with that row's own step, as a per-token dynamic
//   quantization does.
//
// Receptive field: output pixel (oy, ox) of image n, channel m in group g = m / (M/group) sees
// x_q[n, g*C/group + c, oy*sh - pad_top + ky*dh, ox*sw - pad_left + kx*dw] (or z_x outside X)
// for c < C/group, ky < kh, kx < kw, the term k = (c*kh + ky)*kw + kx, against code q[m, k].
//
// IntConv (bits 2..8; codes are used as the integers they are):
//   acc[n,m,p] = sum_k (x_q - z_x) * q[m,k], computed in int32 as sum_k x_q*q - z_x * sum_k q
//   c[m] = s_x * scale[m]                                         (float32, once per call)
//   y = (float)acc * c[m] + B[m]                                  (float32 multiply, then add)
//
// PostConv (bits 2..4; an error otherwise): q is a signed POST index, |q| <= Mx = 2^(bits-1) - 1
// (an error otherwise), standing for sign(q) * scale[m] * sqrt(2)^-(Mx - |q|), and 0 for q = 0
// (onnxq/formats/post.py). With K2 = ceil((Mx-1)/2) (3 at 4 bits, 1 at 3 bits, 0 at 2 bits) and
// e = Mx - |q|, each code is one of two small integer weights, a signed power of two:
//   e even: w_even = sign(q) * 2^(K2 - e/2),       w_odd = 0
//   e odd:  w_odd  = sign(q) * 2^(K2 - (e-1)/2),   w_even = 0
// so that sign(q)*sqrt(2)^-e = (w_even + w_odd/sqrt(2)) * 2^-K2, and |w| <= 8. Two int32 sums,
//   acc_e = sum_k (x_q - z_x) * w_even[m,k],  acc_o = sum_k (x_q - z_x) * w_odd[m,k]
// (each as sum_k x_q*w - z_x * sum_k w; a product x*w with w = +-2^j is +-(x << j)), and
//   c_e[m] = s_x * scale[m] * 2^-K2,  c_o[m] = c_e[m] * 0.70710678118654752f   (float32, in this
//   order, once per call)
//   y = ((float)acc_e * c_e[m] + (float)acc_o * c_o[m]) + B[m]
//
// Without B, the final "+ B[m]" is left out (it would only turn -0 into +0). With R, its value
//   r = R (float32), or r = (float)((int32)R - r_zp) * r_scale (uint8 R: one float32 multiply)
// is added next: y = y + r[n,m,oy,ox] (so y = ((acc*c + B) + r)). Then every output of all four
// ops is clipped: y = min(max(y, clip_min), clip_max), computed as y < clip_min ? clip_min : y,
// then y > clip_max ? clip_max : y (a NaN y stays NaN, and the default bounds change no bits, -0
// included). With hardswish = 1 the clipped y is then
//   t = y * hardswish_alpha; t = t + hardswish_beta; t = clip of t to [0, 1] (as above); y = y * t
// (three float32 operations and the clip, in this order). With post_scale and post_bias, y is then
//   y = y * post_scale[m]; y = y + post_bias[m]          (two float32 operations, in this order).
// PostConvQ/IntConvQ then quantize it as
// ONNX QuantizeLinear does, a float32 division:
//   Y = clamp(round_half_even(y / y_scale) + y_zp, 0, 255)   (a NaN gives 0, +-inf 255 / 0)
// computed as QuantizeDynamicU8's kernels do (quantize_dynamic_u8_kernels.h, QuantizeOne: the
// quotient clamped to [-y_zp, 255 - y_zp], then rounded; the same integer). Float operations are
// With asq_weight and asq_log, sample n's y (all of the above but the quantization, float32) sets
// its own step first (int_conv_asq.cc, the same code for every kernel):
//   f[m] = (sum over the OH*OW pixels of y[n, m] in double) / (OH*OW)   (0 without pixels), the sum
//          in 8 parts: pixel i into part i % 8 (each in order), then ((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7))
//   t = b + f[0]*w[0] + f[1]*w[1] + ...          (double, in this order)
//   t = clip of t to [log_min, log_max] (a NaN t gives log_min)
//   step[n] = (float)exp(t) * y_scale            (double exp rounded to float32, a float32 multiply,
//                                                 then clamped to [FLT_MIN, FLT_MAX])
// and Y[n] is quantized as above with step[n] in place of y_scale (y_zero_point as given); output 1
// holds step[n], which the ops reading Y take as their per-sample x_scale.
// Float operations are
// single float32 operations in exactly the order written (-ffp-contract=off), so every kernel
// gives the same bits. Integer sums are exact in any order, which leaves the SIMD kernels free to
// reorder K and to use multiply-add instructions (vpmaddubsw never saturates for |w| <= 8:
// 2*255*8 = 4080; vpdpbusd never does).
//
// Kernels (attribute `kernel`): the scalar reference (int_conv_reference.cc) is the direct
// loops above. The AVX2 and AVX-512 VNNI kernels run an int8 matrix product over the padded input
// (int_conv_kernels.h) with weights prepared once per node (W is a constant initializer; else
// on every run; one input channel with a kernel of two or more rows, 1-D convolutions over H and
// image models' first layers, runs as the product over quads of 4 kernel rows: int_conv_impl.h,
// UsesTapQuads), or for depthwise
// convolutions a direct sum over the taps: with unit horizontal
// dilation and a horizontal stride of 1 or 2 straight from the float X (DepthwiseFused,
// int_conv_fused.h: row phases for vertical strides, 2 bytes per column at stride 2; each channel
// quantized as it is used, with x * (1/s_x) and a division only next to ties, which gives the same
// x_q; adjacent taps summed by one vpdpbusd per 4 or one vpmaddubsw per 2, AVX2 only the pairs
// with a nonzero weight), else over X quantized (pixels in the vector lanes; for rows under 16
// pixels, channels); PostConv's w_even and w_odd are two rows of the product, so it does twice
// IntConv's integer work (not in AVX2's DepthwiseFused: a code is in one of them, and the zero
// pairs of each are skipped). With per-sample steps
// (x_scale of N elements) the kernels run once per sample, each a one-image call with that
// sample's factors. uint8 X goes to every kernel as it is (the depthwise kernels that quantize
// float X copy its bytes into their padded planes instead). With R or a uint8 Y the kernels
// compute y without the clip, and the output step (int_conv_finish.h, one template over the
// instruction set's traits) adds R, clips, applies the hard swish and quantizes it into Y: a Gemm
// panel's y in registers as it is finished (PanelOutput), the other kernels' from each task's
// scratch (a channel's plane, a block's) while it is in cache (a hard swish with float Y and no R
// goes through the output step too). Per-pixel steps run the matrix product (kQuad; C = 1, which
// Prepare lays out for the depthwise kernels, runs the scalar reference) with its epilogue per pixel
// (Gemm: FinishPixels, int_conv_finish.h, each column's z_x * row sum and factor s_x * scale[m];
// GemmT: FinishT with each pixel's z_x and s_x broadcast); X is quantized by min_max_pixels (quantize_dynamic_u8_simd.h) and quantize_pixels (int_conv_fused.h:
// the depthwise kernels' fixed-point quantization with each lane's own steps).
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cpu.h"
#include "onnxruntime_cxx_api.h"

namespace onnxq {

namespace iconv {
struct Output;         // int_conv_kernels.h
struct PackedWeights;  // int_conv_impl.h
struct Plan;           // int_conv.cc
struct Geometry;       // int_conv_impl.h
}
namespace qdu8 {
struct Params;  // quantize_dynamic_u8_kernels.h
}
struct Kernels;  // kernels.h

// The four ops' names: PostConv, IntConv (float Y), PostConvQ, IntConvQ (uint8 Y).
inline const char* OpName(bool post, bool quantized) {
  return post ? (quantized ? "PostConvQ" : "PostConv") : (quantized ? "IntConvQ" : "IntConv");
}

// The attributes and the kernel choice of one PostConv/IntConv node, and its weights, prepared
// on first use and kept while W is a constant initializer.
class IntConvKernel {
 public:
  IntConvKernel(bool post, bool quantized, const OrtApi& api, const OrtKernelInfo* info);
  ~IntConvKernel();
  OrtStatusPtr ComputeV2(OrtKernelContext* context);

  // Set by the constructor when an attribute is wrong; CreateKernelV2 reports it.
  const std::string& error() const { return error_; }

 private:
  const char* name() const { return OpName(post_, quantized_); }
  void Compute(OrtKernelContext* context);
  // Every check of a call that depends only on X's shape and the constant inputs, and what they
  // give (int_conv.cc, Plan).
  std::shared_ptr<const iconv::Plan> MakePlan(Ort::KernelContext& context, bool x_bytes, bool r_bytes,
                                              uint32_t present);
  void ReadSteps(Ort::KernelContext& context, const iconv::Geometry& g, std::vector<qdu8::Params>* params) const;
  void ComputePixels(Ort::KernelContext& context, const iconv::Plan& plan, iconv::Output output, const float* bias_data);
  float* BindOutput(Ort::KernelContext& context, const iconv::Geometry& g, iconv::Output* output) const;
  void Factors(const float* scale_data, int64_t m_count, const qdu8::Params& p, std::vector<float>* c_e,
               std::vector<float>* c_o) const;
  const float* ReadResidualSteps(Ort::KernelContext& context, const iconv::Geometry& g, std::vector<float>* steps) const;
  void QuantizeSamples(const iconv::Plan& plan, const Kernels& kernels, const float* y, uint8_t* codes,
                       float* steps) const;

  bool post_, quantized_;  // PostConv(Q), and the Q ops (uint8 Y)
  int64_t bits_ = 0, kh_ = 0, kw_ = 0, sh_ = 1, sw_ = 1, dh_ = 1, dw_ = 1, group_ = 1;
  int64_t pad_top_ = 0, pad_left_ = 0, pad_bottom_ = 0, pad_right_ = 0;
  float clip_min_ = -INFINITY, clip_max_ = INFINITY;  // attributes clip_min, clip_max
  int64_t hardswish_ = 0;                              // attributes hardswish, hardswish_alpha, hardswish_beta
  float hardswish_alpha_ = 1.0f / 6.0f, hardswish_beta_ = 0.5f;
  bool pixel_steps_ = false;  // attribute x_steps = "pixel": a step per input pixel (see above)
  Isa isa_ = Isa::kScalar;
  bool w_constant_ = false;  // W is a constant initializer: prepare it once
  uint32_t constant_ = 0;    // bit i: input i is a constant initializer
  std::string error_;

  std::mutex mutex_;  // guards cached_ and plan_ (onnxruntime may run a node's Compute on several threads)
  std::shared_ptr<const iconv::PackedWeights> cached_;
  // The plan of the last call whose constant inputs let it be reused (immutable once made: a call
  // copies the pointer under mutex_ and reads it unlocked; a call with another X shape makes a new one).
  std::shared_ptr<const iconv::Plan> plan_;
};

// The onnxruntime op schema of PostConv (post = true) or IntConv, with float Y, or of PostConvQ or
// IntConvQ (quantized = true: uint8 Y), for one element type of X (input 0) and of R (input 8),
// float or uint8: register.cc adds the four of each name, which onnxruntime merges into one schema
// whose X and R take either type (any other is a session error) and picks the kernel by the types.
// Not the lite custom-op API: its argument wrappers crash on an absent optional input followed by a
// present one (B absent with x_scale given), so inputs are read from the kernel context here.
struct IntConvOp : Ort::CustomOpBase<IntConvOp, IntConvKernel, true> {
  IntConvOp(bool post, bool quantized, ONNXTensorElementDataType x_type, ONNXTensorElementDataType r_type)
      : post_(post), quantized_(quantized), x_type_(x_type), r_type_(r_type) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return OpName(post_, quantized_); }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 15; }
  ONNXTensorElementDataType GetInputType(size_t index) const;
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const;
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return quantized_ && index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }

 private:
  bool post_, quantized_;
  ONNXTensorElementDataType x_type_, r_type_;
};

}  // namespace onnxq
