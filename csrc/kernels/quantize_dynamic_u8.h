// QuantizeDynamicU8: ONNX's DynamicQuantizeLinear (uint8, asymmetric, one scale per tensor) as
// an onnxq op, with a scalar reference kernel and AVX2 / AVX-512 kernels equal to it bit for bit.
//   X (float32, rank >= 1) -> Y (uint8, X's shape), scale (float32 scalar), zero_point (uint8 scalar)
//   lo = min(0, min X), hi = max(0, max X), scale = (hi - lo) / 255, or 1 when hi == lo
//   (onnxruntime's choice for an all-zero or empty X, where the ONNX formula divides by zero),
//   zero_point = round(clamp(-lo / scale, 0, 255)), Y = clamp(round(X / scale) + zero_point, 0, 255),
//   rounding half to even. NaNs in X are ignored by min/max and quantize to 0.
// Attribute `kernel` (int, default 0): 0 the fastest this CPU runs, 1 scalar, 2 AVX2, 3 AVX-512.
#pragma once

#include <cstdint>
#include <string>

#include "cpu.h"
#include "onnxruntime_lite_custom_op.h"

namespace onnxq {

struct QuantizeDynamicU8 {
  QuantizeDynamicU8(const OrtApi* api, const OrtKernelInfo* info);

  Ort::Status Compute(const Ort::Custom::Tensor<float>& x, Ort::Custom::Tensor<uint8_t>& y,
                      Ort::Custom::Tensor<float>& scale, Ort::Custom::Tensor<uint8_t>& zero_point);

 private:
  Isa isa_ = Isa::kScalar;
  // A bad attribute, reported by Compute: a constructor must not throw into onnxruntime.
  std::string error_;
};

}  // namespace onnxq
