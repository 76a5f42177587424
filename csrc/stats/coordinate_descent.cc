// libonnxq_stats.so: the column steps of the coordinate-descent refinement of output-aware weight codes
// (onnxq/numerics/output_error.py, _Descent).
//
// The numpy version takes about twenty numpy calls per column of a weight, which on MiniLM's 384- and
// 1536-column matrices cost more than the arithmetic. This is the same step for every column of one
// block, every group and every row at once, with the same float64 operations in the same order
// (-ffp-contract=off, no reassociation), so its codes, values and gradients equal numpy's bit for bit
// (tests/test_output_error.py). The matrix products that bring the other columns' gradients up to date
// after a block stay in numpy (BLAS). Called through ctypes; the function only reads and writes arrays
// Python owns.
#include <cstddef>
#include <cstdint>
#include <vector>

namespace {

// numpy.searchsorted(bounds, x) (side "left"): how many bounds are below x; NaN sorts after all. The
// search halves a window whose length depends on `count` alone, with a select instead of a branch: the
// rows' values are random to the branch predictor, and the mispredicted branches of a plain binary search
// were most of a sweep's time.
__attribute__((always_inline)) inline int64_t SearchSorted(const double* bounds, int64_t count, double x) {
  if (x != x) return count;
  const double* first = bounds;
  int64_t length = count;
  while (length > 1) {
    const int64_t half = length / 2;
    first = first[half - 1] < x ? first + half : first;  // bounds[0, half) all below x: the answer is past them
    length -= half;
  }
  return (first - bounds) + (length == 1 && first[0] < x ? 1 : 0);
}

}  // namespace

// Columns [start, stop) of one sweep. Arrays (C order): h (G, K, K); gradient, values (G, K, P) float64
// and codes (G, K, P) int8, updated; table (the values of every row's codes, flat) with offsets (G, P)
// (each row's first entry); bounds (nbounds) the level boundaries at unit scale; unit (G, P) each row's
// scale of them; diagonal, inverse (G, K) H's diagonal and its inverse (0 where the diagonal is 0); half
// the code of table entry 0 negated; moves (G, stop - start, P) zeros, receiving each column's changes
// of value; moved (G, P) set where a row's code moved. Per column (as _Descent._column): every row's
// target value + gradient * inverse, the nearest level to it, the change of error that level brings;
// if any row's change is negative, those rows move (the others add a zero move, as numpy does) and the
// block's later columns' gradients take gradient - h[i, j] * move. Returns 1 if any row moved.
// Built for the baseline x86-64 and again for AVX2 and AVX-512 (the loader picks by the CPU): the same
// operations (no contraction, no reassociation), the gradient updates in wider registers.
extern "C" __attribute__((visibility("default"), target_clones("avx512f", "avx2", "default"))) int onnxq_descent_block(int64_t groups, int64_t k, int64_t rows, int64_t start, int64_t stop,
                                   const double* h, double* gradient, double* values, int8_t* codes,
                                   const double* table, const int64_t* offsets, const double* bounds,
                                   int64_t nbounds, const double* unit, const double* diagonal,
                                   const double* inverse, int64_t half, double* moves, uint8_t* moved) {
  const int64_t cells = groups * rows;
  std::vector<double> delta(static_cast<size_t>(cells));
  std::vector<int64_t> index(static_cast<size_t>(cells));
  std::vector<uint8_t> better(static_cast<size_t>(cells));
  const int64_t width = stop - start;
  int any_block = 0;
  for (int64_t j = start; j < stop; ++j) {
    bool any = false;
    for (int64_t g = 0; g < groups; ++g) {
      const double* grad = gradient + (g * k + j) * rows;
      const double* value = values + (g * k + j) * rows;
      const double inv = inverse[g * k + j], diag = diagonal[g * k + j];
      for (int64_t q = 0; q < rows; ++q) {
        const int64_t cell = g * rows + q;
        const double target = value[q] + grad[q] * inv;
        const int64_t level = SearchSorted(bounds, nbounds, target / unit[cell]);
        const double d = table[level + offsets[cell]] - value[q];
        const double change = d * (d * diag - 2.0 * grad[q]);
        delta[cell] = d;
        index[cell] = level;
        better[cell] = change < 0.0;
        any = any || better[cell];
      }
    }
    if (!any) continue;
    any_block = 1;
    for (int64_t g = 0; g < groups; ++g) {
      double* move = moves + (g * width + (j - start)) * rows;
      double* value = values + (g * k + j) * rows;
      int8_t* code = codes + (g * k + j) * rows;
      for (int64_t q = 0; q < rows; ++q) {
        const int64_t cell = g * rows + q;
        move[q] = delta[cell] * (better[cell] ? 1.0 : 0.0);
        if (better[cell]) {
          code[q] = static_cast<int8_t>(index[cell] - half);
          moved[cell] = 1;
        }
        value[q] = value[q] + move[q];
      }
      const double* hg = h + g * k * k;
      for (int64_t i = j + 1; i < stop; ++i) {
        const double hij = hg[i * k + j];
        double* grad = gradient + (g * k + i) * rows;
        for (int64_t q = 0; q < rows; ++q) grad[q] = grad[q] - hij * move[q];
      }
    }
  }
  return any_block;
}
