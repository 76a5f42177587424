// KernelsFor (kernels.h): the instruction set's table of kernels.
#include "kernels/kernels.h"

#include "cpu.h"

namespace onnxq {

#ifdef ONNXQ_X86_SIMD
extern const Kernels kAvx2Kernels;    // kernels_avx2.cc
extern const Kernels kAvx512Kernels;  // kernels_avx512.cc
#endif

namespace {

constexpr Kernels ScalarKernels() {
  Kernels k{};
  k.min_max = qdu8::MinMaxScalar;
  k.quantize = qdu8::QuantizeScalar;
  k.min_max_pixels = qdu8::MinMaxPixelsScalar;
  k.quantize_pixels = qdu8::QuantizePixelsScalar;
  return k;  // (PostConv/IntConv's scalar kernel is ReferenceConv, not a table entry)
}

}  // namespace

const Kernels& KernelsFor(Isa isa) {
  static constexpr Kernels kScalar = ScalarKernels();
  if (isa == Isa::kScalar || !IsaSupported(isa)) return kScalar;
#ifdef ONNXQ_X86_SIMD
  if (isa == Isa::kAvx512) return kAvx512Kernels;
  if (isa == Isa::kAvx2) return kAvx2Kernels;
#endif
  return kScalar;
}

}  // namespace onnxq
