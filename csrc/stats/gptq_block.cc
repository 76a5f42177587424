// libonnxq_stats.so: the column loop of one block of GPTQ's rounding on a uniform grid
// (onnxq/numerics/output_error.py, _gptq_in_order).
//
// numpy takes about ten calls per column (round, decode, the error, the update of the block's later
// columns), a few microseconds each: on MiniLM's 384- and 1536-column layers the calls cost more than the
// arithmetic. This is the same loop with the same float32 codes and values and the same float64 error and
// updates, operation by operation (-ffp-contract=off, no reassociation), so its codes and the updated
// columns equal numpy's bit for bit (tests/test_output_error.py). The matrix product that carries the
// block's errors to the columns after it stays in numpy (BLAS).
#include <cstdint>

#include "uniform_codes.h"

// Columns [start, stop) of GPTQ's loop. w (k, rows) float64: W transposed, in GPTQ's column order, updated
// in place (the block's later columns take each column's error); upper (k, k) float64: the upper factor of
// H^-1 in that order; scale float32 the scales: column j's row r at scale[j * scale_stride + r] (stride 0:
// one scale per row for every column; stride rows: a scale per code, as blocks of inputs have); q the largest code; sqrt_codes nonzero for
// sqrt codes; codes (k, rows) int8 receives the block's codes; errors (stop - start, rows) float64 the
// block's errors divided by the factor's diagonal (what the later blocks' update multiplies).
extern "C" __attribute__((visibility("default"), target_clones("avx512f", "avx2", "default"))) void onnxq_gptq_block(
    int64_t k, int64_t rows, int64_t start, int64_t stop, double* w, const double* upper, const float* scale,
    int64_t scale_stride, float q, int sqrt_codes, int8_t* codes, double* errors) {
  const bool sqrt_grid = sqrt_codes != 0;
  for (int64_t j = start; j < stop; ++j) {
    double* column = w + j * rows;
    double* error = errors + (j - start) * rows;
    int8_t* code = codes + j * rows;
    const double pivot = upper[j * k + j];
    const float* column_scale = scale + j * scale_stride;
    for (int64_t r = 0; r < rows; ++r) {
      const float s = column_scale[r];
      const float c = onnxq_stats::NearestCode(onnxq_stats::ToDomain(static_cast<float>(column[r]), sqrt_grid), s, q);
      code[r] = static_cast<int8_t>(c);
      error[r] = (column[r] - static_cast<double>(onnxq_stats::CodeValue(c, s, sqrt_grid))) / pivot;
    }
    for (int64_t i = j + 1; i < stop; ++i) {
      const double u = upper[j * k + i];
      double* later = w + i * rows;
      for (int64_t r = 0; r < rows; ++r) later[r] = later[r] - u * error[r];
    }
  }
}
