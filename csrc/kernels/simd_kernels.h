// The library's SIMD kernels as templates over an instruction set's traits, and SimdKernels<T>(),
// the table (kernels.h) of their instantiations with T. Included only by kernels_avx2.cc and
// kernels_avx512.cc, each of which defines its traits struct (Avx2, Avx512) and instantiates
// everything here with it under its own -m flags (CMakeLists.txt).
//
// Each kernel's logic lives once, in these headers; the traits hold what differs between the
// instruction sets: vector types and widths, the loads, stores, multiply-adds and shuffles the
// kernels are made of, and a few tile sizes and choices measured on each. Everything here and in
// the traits has internal linkage (anonymous namespaces): an inline function compiled in the
// AVX-512 file must never be the copy the linker keeps for callers in the AVX2 or scalar code.
// For the same reason these files use no standard-library templates (std::min, containers).
//
// What a traits struct T provides (kernels_avx2.cc's Avx2 and kernels_avx512.cc's Avx512 list them
// in this order, each with what it does):
//   vectors            I (integer) and F (float32) vectors, kBytes and kFloats (float32 lanes)
//   loads and stores   Load, Store, LoadF, StoreF, and of the first n lanes LoadFirstF,
//                      LoadFirst32, StoreFirst8 (bytes), MaskStoreF, StoreFirstF
//   arithmetic         Zero, ZeroF, Set8, Set32, SetF, Add32, Sub32, Mul32, ShiftLeft32, ShiftRight32, Add,
//                      Mul, Div, MulAdd, Min, Max, Clip, ToFloat, RoundToInt, AsInt
//   widening, shuffles WidenI16, WidenU8, MaddI16, MoveHdup, EvenLanes, Transpose
//   QuantizeDynamicU8  PackBytes, StoreBytesFirst
//   Gemm, GemmT        kInt16Sums, tile sizes kGemmVectors, kGemmTBlocks, GemmTPixels(blocks), Broadcast4,
//                      AddProducts (the multiply-add of bytes), Widen, WidenTimes16 (int16 sums
//                      only), kPinSums, kPinWeights, Pin
//   fused quantization AnyFixedTie, PackFixedBytes, FixedDwords, StoreQuarters, StoreQuartersFirst
//   FinishTBytes       TransposeDwords4, LoadLanes, StoreLanes, StoreLanesFirst (128-bit lanes from or to rows)
//   LanesFused         kLaneTaps, InterleaveLo8, InterleaveHi8, Lane128, LaneCell, ShiftCellsByte
//                      (cells of 4 only), LaneSumsFrom, LaneInt32, ScatterLanes
//   DepthwiseFused     struct Fused: the block's tap sums, the one part written per instruction
//                      set (int_conv_fused.h says why and what it provides)
#pragma once

#include "kernels/int_conv_depthwise.h"
#include "kernels/int_conv_finish.h"
#include "kernels/int_conv_fused.h"
#include "kernels/int_conv_gemm.h"
#include "kernels/kernels.h"
#include "kernels/quantize_dynamic_u8_simd.h"

namespace onnxq {

namespace {

template <class T>
constexpr Kernels SimdKernels() {
  Kernels k{};
  k.min_max = qdu8::MinMax<T>;
  k.quantize = qdu8::Quantize<T>;
  k.min_max_pixels = qdu8::MinMaxPixels<T>;
  k.quantize_pixels = iconv::QuantizePixelsKernel<T>;
  k.gemm = iconv::GemmKernel<T>;
  k.gemm_t = iconv::GemmTFinishKernel<T>;
  k.finish_run = iconv::FinishRunKernel<T>;
  k.finish_pixels = iconv::FinishPixelsKernel<T>;
  k.depthwise = iconv::DepthwiseKernel<T>;
  k.depthwise_lanes = iconv::DepthwiseLanesKernel<T>;
  k.depthwise_fused = iconv::DepthwiseFusedKernel<T>;
  k.quantize_fused = iconv::QuantizeFusedKernel<T>;
  k.lanes_fused = iconv::LanesFusedKernel<T>;
  k.output = iconv::OutputKernel<T>;
  k.panel_output = iconv::PanelOutputKernel<T>;
  k.int16_sums = T::kInt16Sums;
  k.fused_tap_groups = T::Fused::kTapGroups;
  k.fused_quantize_rows = T::Fused::kQuantizeRows;
  k.fused_row_columns = T::Fused::kRowColumns;
  k.lane_taps = T::kLaneTaps;
  return k;
}

}  // namespace

}  // namespace onnxq
