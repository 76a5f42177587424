// ASQ's per-sample output step of IntConvQ and PostConvQ (int_conv.h: inputs 13 and 14, output 1): the
// step adapter of onnxq/calibrate/asq.py computed from the op's own float output, sample by sample, so
// that the op writes uint8 codes with the step its readers take (onnxq/rewrite/chains.py). Scalar code
// shared by every kernel: the float y it reads is the same bits on every instruction set.
#pragma once

#include <cstdint>
#include <vector>

namespace onnxq {
namespace iconv {

struct AsqStep {
  std::vector<float> weight;  // [M]: w, one per output channel (empty: the op has no ASQ step)
  float bias = 0.0f;          // b
  float log_min = 0.0f;       // the clip of f . w + b
  float log_max = 0.0f;
  float scale = 0.0f;         // y_scale: the step the factor multiplies

  bool present() const { return !weight.empty(); }
  // One sample's step from its float y: M channel planes of `pixels` values each (int_conv.h).
  float Of(const float* y, int64_t pixels) const;
};

}  // namespace iconv
}  // namespace onnxq
