// MaxPoolQ (max_pool_q.h): attributes, checks, and the pooling over the codes.
#include "kernels/max_pool_q.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <vector>

#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "kernels/quantize_dynamic_u8_kernels.h"

namespace onnxq {
namespace {

bool ReadInts(const OrtApi* api, const OrtKernelInfo* info, const char* name, std::vector<int64_t>* values) {
  size_t size = 0;
  if (OrtStatus* status = api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &size)) {
    api->ReleaseStatus(status);
    return false;
  }
  values->resize(size);
  if (size == 0) return true;
  if (OrtStatus* status = api->KernelInfoGetAttributeArray_int64(info, name, values->data(), &size)) {
    api->ReleaseStatus(status);
    return false;
  }
  return true;
}

// One plane (H x W codes) into its OH x OW outputs: the largest code of each window, through `table`.
// identity: the table maps every code to itself (the same step in and out), so it is left out.
void PoolPlane(const uint8_t* x, int64_t w, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t oh,
               int64_t ow, const uint8_t* table, bool identity, uint8_t* y) {
  int64_t done = 0;
  if (w == 1 && kw == 1 && kh == 2 && sh == 2) {  // a column pooled by pairs (1-D convolutions over H, CREPE)
#ifdef __SSE2__
    const __m128i low = _mm_set1_epi16(0x00FF);
    for (; done + 16 <= oh; done += 16) {  // 32 codes -> 16: the larger of each pair, in the even bytes, packed
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 2 * done));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 2 * done + 16));
      const __m128i ma = _mm_and_si128(_mm_max_epu8(a, _mm_srli_epi16(a, 8)), low);
      const __m128i mb = _mm_and_si128(_mm_max_epu8(b, _mm_srli_epi16(b, 8)), low);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y + done), _mm_packus_epi16(ma, mb));
    }
    if (!identity) {
      for (int64_t i = 0; i < done; ++i) y[i] = table[y[i]];
    }
#endif
  }
  for (int64_t o = done; o < oh * ow; ++o) {
    const int64_t oy = o / ow, ox = o % ow;
    uint8_t largest = 0;
    for (int64_t ky = 0; ky < kh; ++ky) {
      const uint8_t* row = x + (oy * sh + ky) * w + ox * sw;
      for (int64_t kx = 0; kx < kw; ++kx) largest = std::max(largest, row[kx]);
    }
    y[o] = table[largest];
  }
}

}  // namespace

MaxPoolQ::MaxPoolQ(const OrtApi* api, const OrtKernelInfo* info) {
  std::vector<int64_t> kernel, strides;
  if (!ReadInts(api, info, "kernel_shape", &kernel) || kernel.size() != 2 || kernel[0] < 1 || kernel[1] < 1) {
    error_ = "MaxPoolQ: attribute kernel_shape must be 2 positive ints [kh, kw]";
    return;
  }
  kh_ = kernel[0];
  kw_ = kernel[1];
  if (!ReadInts(api, info, "strides", &strides)) strides = kernel;
  if (strides.size() != 2 || strides[0] < 1 || strides[1] < 1) {
    error_ = "MaxPoolQ: attribute strides must be 2 positive ints [sh, sw]";
    return;
  }
  sh_ = strides[0];
  sw_ = strides[1];
}

Ort::Status MaxPoolQ::Compute(const Ort::Custom::Tensor<uint8_t>& x, const Ort::Custom::Tensor<float>& x_scale,
                              const Ort::Custom::Tensor<uint8_t>& x_zero_point, const Ort::Custom::Tensor<float>& y_scale,
                              const Ort::Custom::Tensor<uint8_t>& y_zero_point, Ort::Custom::Tensor<uint8_t>& y) {
  if (!error_.empty()) return Ort::Status{error_.c_str(), ORT_INVALID_ARGUMENT};
  try {  // onnxruntime's C++ wrappers throw (e.g. when an output cannot be allocated)
    const std::vector<int64_t>& shape = x.Shape();
    if (shape.size() != 4) {
      return Ort::Status{("MaxPoolQ: input X must have rank 4 (N, C, H, W), got rank " + std::to_string(shape.size())).c_str(),
                         ORT_INVALID_ARGUMENT};
    }
    if (shape[2] < kh_ || shape[3] < kw_) {
      return Ort::Status{("MaxPoolQ: X's H x W (" + std::to_string(shape[2]) + " x " + std::to_string(shape[3]) +
                          ") is smaller than the kernel (" + std::to_string(kh_) + " x " + std::to_string(kw_) + ")")
                             .c_str(),
                         ORT_INVALID_ARGUMENT};
    }
    for (const auto* step : {&x_scale, &y_scale}) {
      if (step->NumberOfElement() != 1 || !(step->Data()[0] > 0.0f && step->Data()[0] <= 3.4028235e38f)) {
        return Ort::Status{"MaxPoolQ: x_scale and y_scale must be one positive, finite float32 value each",
                           ORT_INVALID_ARGUMENT};
      }
    }
    if (x_zero_point.NumberOfElement() != 1 || y_zero_point.NumberOfElement() != 1) {
      return Ort::Status{"MaxPoolQ: x_zero_point and y_zero_point must be one uint8 value each", ORT_INVALID_ARGUMENT};
    }
    const int64_t n = shape[0], c = shape[1], h = shape[2], w = shape[3];
    const int64_t oh = (h - kh_) / sh_ + 1, ow = (w - kw_) / sw_ + 1;
    uint8_t* out = y.Allocate({n, c, oh, ow});
    // Q(D(q)) for every code q: DequantizeLinear's one multiply, then QuantizeLinear's division and rounding.
    const float s_x = x_scale.Data()[0];
    const int32_t z_x = x_zero_point.Data()[0], z_y = y_zero_point.Data()[0];
    const qdu8::Params p{y_scale.Data()[0], static_cast<float>(-z_y), static_cast<float>(255 - z_y), z_y};
    uint8_t table[256];
    bool identity = true;
    for (int32_t q = 0; q < 256; ++q) {
      table[q] = qdu8::QuantizeOne(static_cast<float>(q - z_x) * s_x, p);
      identity = identity && table[q] == q;
    }
    const uint8_t* in = x.Data();
    for (int64_t plane = 0; plane < n * c; ++plane) {
      PoolPlane(in + plane * h * w, w, kh_, kw_, sh_, sw_, oh, ow, table, identity, out + plane * oh * ow);
    }
    return Ort::Status{nullptr};
  } catch (const std::exception& error) {
    return Ort::Status{error};
  }
}

}  // namespace onnxq
