// ASQ's per-sample output step (int_conv_asq.h; the definition is int_conv.h's).
#include "kernels/int_conv_asq.h"

#include <cfloat>
#include <cmath>

namespace onnxq {
namespace iconv {

float AsqStep::Of(const float* y, int64_t pixels) const {
  double t = bias;
  const auto channels = static_cast<int64_t>(weight.size());
  for (int64_t m = 0; m < channels; ++m) {
    double sum = 0.0;
    const float* plane = y + m * pixels;
    for (int64_t i = 0; i < pixels; ++i) sum += plane[i];
    const double mean = pixels > 0 ? sum / static_cast<double>(pixels) : 0.0;
    t += mean * static_cast<double>(weight[m]);
  }
  if (!(t >= log_min)) t = log_min;  // (a NaN too)
  if (t > log_max) t = log_max;
  const float step = static_cast<float>(std::exp(t)) * scale;
  return step < FLT_MIN ? FLT_MIN : step > FLT_MAX ? FLT_MAX : step;
}

}  // namespace iconv
}  // namespace onnxq
