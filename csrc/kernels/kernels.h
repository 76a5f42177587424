// The kernels of the library's ops as one table per instruction set, and KernelsFor: the one place
// where an instruction set (the ops' `kernel` attribute, or the fastest this CPU runs: cpu.h)
// becomes code. The ops and the SIMD driver (int_conv_simd.cc) call kernels only through a table.
//
// Where the tables come from: the scalar one holds the reference kernels (quantize_dynamic_u8.cc;
// PostConv/IntConv's scalar kernel is ReferenceConv, called directly). The AVX2 and AVX-512 tables
// are defined by the files compiled with those instruction sets (CMakeLists.txt), which no other
// file calls into except through them.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/int_conv_kernels.h"
#include "kernels/quantize_dynamic_u8_kernels.h"

namespace onnxq {

// (cpu.h; declared, not included: the files compiled per instruction set include this header, and
// must not compile cpu.h's inline functions, whose copy the linker could keep for every caller.)
enum class Isa : int;

struct Kernels {
  // QuantizeDynamicU8 (quantize_dynamic_u8_kernels.h), also PostConv/IntConv's quantization of X:
  // min_max folds x[0, n) into *mn / *mx (which start at +inf / -inf), quantize writes y[0, n).
  void (*min_max)(const float* x, size_t n, float* mn, float* mx);
  void (*quantize)(const float* x, size_t n, const qdu8::Params& p, uint8_t* y);
  // IntConv's per-pixel steps (int_conv.h, x_steps = "pixel"; quantize_dynamic_u8_kernels.h): each
  // pixel's range over the channels of one image, and the image quantized with each pixel's steps.
  void (*min_max_pixels)(const float* x, int64_t channels, int64_t pixels, float* mn, float* mx);
  void (*quantize_pixels)(const float* x, int64_t channels, int64_t pixels, const qdu8::PixelSteps& s, uint8_t* y);

  // PostConv/IntConv's SIMD kernels (int_conv_kernels.h has what each computes); null in the scalar
  // table.
  void (*gemm)(const iconv::Gemm& g);
  // GemmT's product C and its epilogue FinishT f (f.c = g.c), in one pass where the kernel can finish
  // from its registers (int_conv_finish.h, GemmTFinishKernel).
  void (*gemm_t)(const iconv::GemmT& g, const iconv::FinishT& f);
  void (*finish_run)(const int32_t* e, const int32_t* o, int64_t n, int32_t z_e, int32_t z_o, float c_e, float c_o,
                     const float* bias, float lo, float hi, float* out);
  void (*finish_pixels)(const int32_t* e, int64_t n, int32_t row_sum, const int32_t* z, const float* s, float scale,
                        const float* bias, float lo, float hi, float* out);
  void (*depthwise)(const iconv::Depthwise& d);
  void (*depthwise_lanes)(const iconv::DepthwiseLanes& d);
  void (*depthwise_fused)(const iconv::DepthwiseFused& d);
  void (*quantize_fused)(const iconv::DepthwiseFused& d, int64_t n, uint8_t* dst);
  void (*lanes_fused)(const iconv::LanesFused& d);
  // The epilogue's residual, clip and uint8 Y (int_conv_kernels.h, Output) over a run of n floats
  // y[0, n), unclipped, to Y's elements [at, at + n).
  void (*output)(const iconv::Output& o, const float* y, int64_t n, int64_t at);
  // A Gemm panel's epilogue straight through the output step (int_conv_kernels.h, PanelOutput).
  void (*panel_output)(const iconv::PanelOutput& p);

  // What those kernels ask of the data that Prepare (int_conv_reference.cc) and the driver lay out
  // for them: constants of the instruction set's traits (simd_kernels.h); 0 in the scalar table.
  bool int16_sums;           // Gemm, GemmT: int16 sums (|w| <= 8: runs of k, Int16Runs; |w| <= 64:
                             // Gemm::wide; wider weights split: Gemm::a_hi)
  bool fused_tap_groups;     // DepthwiseFused: dense groups of 4 taps (PackedWeights::quads), else
                             // the nonzero pairs of taps (FusedPair; only where every list is narrow)
  bool fused_quantize_rows;  // DepthwiseFused quantizes X into its plane itself, else copies
                             // DepthwiseFused::bytes (quantize_fused's) into it
  int fused_row_columns;     // DepthwiseFused: the plane's rows hold whole multiples of this many
                             // matrix columns
  int lane_taps;             // LanesFused's G: 4 (PackedWeights::lane_quads; cells can serve two
                             // outputs: LanesStep) or 2 (lane_pairs)
};

// The kernels of `isa` (kScalar, kAvx2 or kAvx512). Callers choose an isa that IsaSupported; any
// other (kAuto, or one this CPU lacks) gets the scalar table, never code this CPU cannot run.
const Kernels& KernelsFor(Isa isa);

}  // namespace onnxq
