// KernelsFor (kernels.h): the instruction set's table of kernels.
#include "kernels/kernels.h"

namespace onnxq {

namespace {

constexpr Kernels ScalarKernels() {
  Kernels k{};
  k.min_max = qdu8::MinMaxScalar;
  k.quantize = qdu8::QuantizeScalar;
  return k;  // (PostConv/IntConv's scalar kernel is ReferenceConv, not a table entry)
}

#ifdef ONNXQ_X86_SIMD
constexpr Kernels Avx2Kernels() {
  Kernels k{};
  k.min_max = qdu8::MinMaxAvx2;
  k.quantize = qdu8::QuantizeAvx2;
  k.gemm = iconv::GemmAvx2;
  k.gemm_t = iconv::GemmTAvx2;
  k.finish_t = iconv::FinishTAvx2;
  k.finish_run = iconv::FinishRunAvx2;
  k.depthwise = iconv::DepthwiseAvx2;
  k.depthwise_lanes = iconv::DepthwiseLanesAvx2;
  k.depthwise_fused = iconv::DepthwiseFusedAvx2;
  k.quantize_fused = iconv::QuantizeFusedAvx2;
  k.lanes_fused = iconv::LanesFusedAvx2;
  return k;
}

constexpr Kernels Avx512Kernels() {
  Kernels k{};
  k.min_max = qdu8::MinMaxAvx512;
  k.quantize = qdu8::QuantizeAvx512;
  k.gemm = iconv::GemmAvx512;
  k.gemm_t = iconv::GemmTAvx512;
  k.finish_t = iconv::FinishTAvx512;
  k.finish_run = iconv::FinishRunAvx512;
  k.depthwise = iconv::DepthwiseAvx512;
  k.depthwise_lanes = iconv::DepthwiseLanesAvx2;  // (16 int16 lanes: one block of channels either way)
  k.depthwise_fused = iconv::DepthwiseFusedAvx512;
  k.quantize_fused = iconv::QuantizeFusedAvx512;
  k.lanes_fused = iconv::LanesFusedAvx512;
  return k;
}
#endif

}  // namespace

const Kernels& KernelsFor(Isa isa) {
  static constexpr Kernels kScalar = ScalarKernels();
  if (isa == Isa::kScalar || !IsaSupported(isa)) return kScalar;
#ifdef ONNXQ_X86_SIMD
  static constexpr Kernels kAvx2 = Avx2Kernels();
  static constexpr Kernels kAvx512 = Avx512Kernels();
  if (isa == Isa::kAvx512) return kAvx512;
  if (isa == Isa::kAvx2) return kAvx2;
#endif
  return kScalar;
}

}  // namespace onnxq
