// Which instruction sets this CPU runs, for choosing kernels at run time.
#pragma once

namespace onnxq {

// Kernel variants. The values are those of the ops' `kernel` attribute.
enum class Isa : int { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

inline const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAuto: return "auto";
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "AVX2";
    case Isa::kAvx512: return "AVX-512";
  }
  return "unknown";
}

// Whether code for `isa` can run here. Each check names every -m flag that CMakeLists.txt
// compiles the *_avx2.cc / *_avx512.cc files with (the compiler may use any of them), and
// __builtin_cpu_supports also checks that the OS saves the YMM/ZMM registers.
inline bool IsaSupported(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
#ifdef ONNXQ_X86_SIMD
    case Isa::kAvx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vnni");
#endif
    default: return false;
  }
}

// The fastest variant this CPU runs.
inline Isa BestIsa() {
  if (IsaSupported(Isa::kAvx512)) return Isa::kAvx512;
  if (IsaSupported(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kScalar;
}

}  // namespace onnxq
