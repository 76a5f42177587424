// QuantizeDynamicU8: the onnxruntime op and the scalar reference kernels (the SIMD ones: kernels.h).
#include "kernels/quantize_dynamic_u8.h"

#include <exception>
#include <vector>

#include "kernels/kernels.h"
#include "kernels/quantize_dynamic_u8_kernels.h"

namespace onnxq {
namespace qdu8 {

// The reference kernels: they define the semantics the SIMD variants must reproduce exactly.
void MinMaxScalar(const float* x, size_t n, float* mn, float* mx) {
  for (size_t i = 0; i < n; ++i) {
    *mn = FoldMin(x[i], *mn);
    *mx = FoldMax(x[i], *mx);
  }
}

void QuantizeScalar(const float* x, size_t n, const Params& p, uint8_t* y) {
  for (size_t i = 0; i < n; ++i) y[i] = QuantizeOne(x[i], p);
}

void MinMaxPixelsScalar(const float* x, int64_t channels, int64_t pixels, float* mn, float* mx) {
  for (int64_t p = 0; p < pixels; ++p) {
    mn[p] = INFINITY;
    mx[p] = -INFINITY;
  }
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t p = 0; p < pixels; ++p) {
      mn[p] = FoldMin(x[c * pixels + p], mn[p]);
      mx[p] = FoldMax(x[c * pixels + p], mx[p]);
    }
  }
}

void QuantizePixelsScalar(const float* x, int64_t channels, int64_t pixels, const PixelSteps& s, uint8_t* y) {
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t p = 0; p < pixels; ++p) {
      const Params params{s.scale[p], s.lo[p], s.hi[p], s.zero_point[p]};
      y[c * pixels + p] = QuantizeOne(x[c * pixels + p], params);
    }
  }
}

// Scale and zero point from the data's range, as onnxruntime's DynamicQuantizeLinear computes them.
Params MakeParams(float mn, float mx) {
  mn = mn < 0.0f ? mn : 0.0f;  // the range includes 0 (also turns -0 and an empty X's +inf into 0)
  mx = mx > 0.0f ? mx : 0.0f;
  const float scale = mx == mn ? 1.0f : (mx - mn) / 255.0f;
  float zero_point = 0.0f - mn / scale;
  zero_point = zero_point > 0.0f ? (zero_point < 255.0f ? zero_point : 255.0f) : 0.0f;
  const auto z = static_cast<int32_t>(nearbyintf(zero_point));
  return {scale, static_cast<float>(-z), static_cast<float>(255 - z), z};
}

}  // namespace qdu8

QuantizeDynamicU8::QuantizeDynamicU8(const OrtApi* api, const OrtKernelInfo* info) {
  int64_t kernel = 0;
  if (OrtStatus* absent = api->KernelInfoGetAttribute_int64(info, "kernel", &kernel)) {
    api->ReleaseStatus(absent);
    kernel = 0;
  }
  if (kernel < 0 || kernel > 3) {
    error_ = "QuantizeDynamicU8: attribute kernel must be 0 (auto), 1 (scalar), 2 (AVX2) or 3 (AVX-512), not " +
             std::to_string(kernel);
    return;
  }
  isa_ = kernel == 0 ? BestIsa() : static_cast<Isa>(kernel);
  if (!IsaSupported(isa_)) {
    error_ = std::string("QuantizeDynamicU8: attribute kernel=") + std::to_string(kernel) + " asks for the " +
             IsaName(isa_) + " kernel, which this CPU does not support";
  }
}

Ort::Status QuantizeDynamicU8::Compute(const Ort::Custom::Tensor<float>& x, Ort::Custom::Tensor<uint8_t>& y,
                                       Ort::Custom::Tensor<float>& scale,
                                       Ort::Custom::Tensor<uint8_t>& zero_point) {
  if (!error_.empty()) return Ort::Status{error_.c_str(), ORT_INVALID_ARGUMENT};
  try {  // onnxruntime's C++ wrappers throw (e.g. when an output cannot be allocated)
    const std::vector<int64_t>& shape = x.Shape();
    if (shape.empty()) {
      return Ort::Status{"QuantizeDynamicU8: input X must have rank >= 1, got a scalar", ORT_INVALID_ARGUMENT};
    }
    const auto n = static_cast<size_t>(x.NumberOfElement());
    const float* src = x.Data();
    uint8_t* dst = y.Allocate(shape);

    const Kernels& kernels = KernelsFor(isa_);
    float mn = INFINITY, mx = -INFINITY;
    kernels.min_max(src, n, &mn, &mx);
    const qdu8::Params params = qdu8::MakeParams(mn, mx);
    kernels.quantize(src, n, params, dst);

    *scale.Allocate({}) = params.scale;
    *zero_point.Allocate({}) = static_cast<uint8_t>(params.zero_point);
    return Ort::Status{nullptr};
  } catch (const std::exception& error) {
    return Ort::Status{error};
  }
}

}  // namespace onnxq
