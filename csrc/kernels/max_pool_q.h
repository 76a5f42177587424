// MaxPoolQ: ONNX's DequantizeLinear -> MaxPool -> QuantizeLinear on uint8 codes in one op, which
// keeps the codes uint8 between onnxq's ops (CREPE: IntConvQ -> max-pool by 2 -> IntConvQ).
//   X (uint8, N C H W), x_scale (float32 scalar, positive and finite), x_zero_point (uint8 scalar),
//   y_scale (float32 scalar, positive and finite), y_zero_point (uint8 scalar) -> Y (uint8, N C OH OW)
//   Y[n, c, oy, ox] = Q(D(max over ky < kh, kx < kw of X[n, c, oy*sh + ky, ox*sw + kx]))
//   D(q) = (float)((int32)q - x_zero_point) * x_scale        (DequantizeLinear, one float32 multiply)
//   Q(v) = clamp(round_half_even(v / y_scale) + y_zero_point, 0, 255)   (QuantizeLinear: qdu8::QuantizeOne)
//   OH = (H - kh) / sh + 1, OW = (W - kw) / sw + 1 (no padding, floor), H >= kh and W >= kw.
// D is monotonic (x_scale > 0), so the largest code of a window dequantizes to the window's largest
// value: the same Y as the three ONNX ops, bit for bit. Q(D(q)) is a table of 256 bytes per call.
// Attributes: kernel_shape (required, [kh, kw]), strides ([sh, sw], default kernel_shape).
#pragma once

#include <cstdint>
#include <string>

#include "onnxruntime_lite_custom_op.h"

namespace onnxq {

struct MaxPoolQ {
  MaxPoolQ(const OrtApi* api, const OrtKernelInfo* info);

  Ort::Status Compute(const Ort::Custom::Tensor<uint8_t>& x, const Ort::Custom::Tensor<float>& x_scale,
                      const Ort::Custom::Tensor<uint8_t>& x_zero_point, const Ort::Custom::Tensor<float>& y_scale,
                      const Ort::Custom::Tensor<uint8_t>& y_zero_point, Ort::Custom::Tensor<uint8_t>& y);

 private:
  int64_t kh_ = 0, kw_ = 0, sh_ = 0, sw_ = 0;
  // A bad attribute, reported by Compute: a constructor must not throw into onnxruntime.
  std::string error_;
};

}  // namespace onnxq
