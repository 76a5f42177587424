// libonnxq_stats.so: the counting loops of onnxq's calibration histograms (onnxq/calibrate/histogram.py).
//
// numpy needs five or six passes and a 64-bit index array per histogram update (multiply, floor,
// convert, offset, clip, bincount); these loops do one pass per histogram with the same float32
// arithmetic, so their counts equal numpy's bit for bit (tests/test_native_stats.py). Called through
// ctypes; the exported functions are plain C and only read and add to arrays Python owns.
//
// Counting a bin that repeats (a Relu's zeros are half of some tensors) chains each increment on
// the previous one through memory, so runs are counted into four interleaved sub-histograms and
// added at the end.
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// The bins are computed in int32 so that the compiler can vectorise them (SSE2 converts four floats
// to int32 at once, not to int64); a histogram never has 2^30 bins.

// floor(t) for |t| < 2^30, as a truncating conversion: an exact float32 floor without SSE4.1's
// roundps (this file is built for the baseline x86-64).
inline int32_t FloorToInt(float t) {
  const auto truncated = static_cast<int32_t>(t);
  return truncated - static_cast<int32_t>(static_cast<float>(truncated) > t);
}

inline int32_t Clip(int32_t index, int32_t bins) {
  index = index > 0 ? index : 0;
  return index < bins - 1 ? index : bins - 1;
}

// The bin of x in a histogram of `bins` bins of width 1 / inverse_width centred on zero, clipped.
// Scaled values are clamped to [-bins, bins] before the conversion, so any float (NaN too) is safe.
struct CentredBin {
  float inverse_width;
  int32_t bins;

  int32_t operator()(float x) const {
    const float limit = static_cast<float>(bins);
    float t = x * inverse_width;
    t = t > -limit ? t : -limit;
    t = t < limit ? t : limit;
    return Clip(FloorToInt(t) + bins / 2, bins);
  }
};

// The bin of x in `bins` equal bins over [lo, lo + span], with numpy's float32 operation order:
// ((x - lo) / span) * bins, floored and clipped.
struct SpanBin {
  float lo, span;
  int32_t bins;

  int32_t operator()(float x) const {
    const float limit = static_cast<float>(bins);
    float t = ((x - lo) / span) * limit;
    t = t > -1.0f ? t : -1.0f;
    t = t < limit ? t : limit;
    return Clip(FloorToInt(t), bins);
  }
};

// Four interleaved sub-histograms of `bins` 32-bit counters, reused for every run and moved into
// 64-bit totals by AddTo (and before any counter could overflow).
class SubCounts {
 public:
  explicit SubCounts(int64_t bins) : bins_(bins), counts_(static_cast<size_t>(4 * bins), 0) {}

  template <class BinOf>
  void Count(const float* x, int64_t n, BinOf bin_of) {
    int32_t index[kBlock];
    uint32_t* c = counts_.data();
    while (n > 0) {
      const int64_t block = std::min(std::min(n, kBlock), kMaxPending - pending_);
      for (int64_t i = 0; i < block; ++i) index[i] = bin_of(x[i]);  // vectorised
      int64_t i = 0;
      for (; i + 4 <= block; i += 4) {
        ++c[index[i]];
        ++c[bins_ + index[i + 1]];
        ++c[2 * bins_ + index[i + 2]];
        ++c[3 * bins_ + index[i + 3]];
      }
      for (; i < block; ++i) ++c[index[i]];
      x += block;
      n -= block;
      pending_ += block;
      if (pending_ == kMaxPending) Flush();
    }
  }

  // Adds everything counted so far to `out` (bins int64 counters) and starts again from zero.
  void AddTo(int64_t* out) {
    Flush();
    for (int64_t b = 0; b < bins_; ++b) {
      out[b] += totals_[static_cast<size_t>(b)];
      totals_[static_cast<size_t>(b)] = 0;
    }
  }

 private:
  static constexpr int64_t kBlock = 512;                      // bins computed ahead of counting
  static constexpr int64_t kMaxPending = int64_t{1} << 31;  // values per flush: no uint32 counter can overflow

  void Flush() {
    totals_.resize(static_cast<size_t>(bins_), 0);
    for (int k = 0; k < 4; ++k) {
      for (int64_t b = 0; b < bins_; ++b) {
        auto& counter = counts_[static_cast<size_t>(k * bins_ + b)];
        totals_[static_cast<size_t>(b)] += counter;
        counter = 0;
      }
    }
    pending_ = 0;
  }

  int64_t bins_;
  std::vector<uint32_t> counts_;
  std::vector<int64_t> totals_;
  int64_t pending_ = 0;
};

}  // namespace

#define ONNXQ_STATS_API __attribute__((visibility("default")))

extern "C" {

// counts[bins] += the bins of x[n] in a histogram centred on zero with bin width 1 / inverse_width
// (a power of two, so x * inverse_width is exact), clipped to [0, bins).
ONNXQ_STATS_API void onnxq_count_centred(const float* x, int64_t n, float inverse_width, int64_t bins, int64_t* counts) {
  SubCounts sub(bins);
  sub.Count(x, n, CentredBin{inverse_width, static_cast<int32_t>(bins)});
  sub.AddTo(counts);
}

// x is (outer, channels, inner) in memory order; channel c has its own inverse width. Adds to
// counts[channels][bins].
ONNXQ_STATS_API void onnxq_count_channels(const float* x, int64_t outer, int64_t channels, int64_t inner,
                          const float* inverse_widths, int64_t bins, int64_t* counts) {
  if (inner == 1) {  // channels last, e.g. (N, T, C): one value per channel per row
    for (int64_t o = 0; o < outer; ++o) {
      const float* row = x + o * channels;
      for (int64_t c = 0; c < channels; ++c) {
        ++counts[c * bins + CentredBin{inverse_widths[c], static_cast<int32_t>(bins)}(row[c])];
      }
    }
    return;
  }
  SubCounts sub(bins);
  for (int64_t c = 0; c < channels; ++c) {
    const float inverse_width = inverse_widths[c];
    for (int64_t o = 0; o < outer; ++o) {
      sub.Count(x + (o * channels + c) * inner, inner, CentredBin{inverse_width, static_cast<int32_t>(bins)});
    }
    sub.AddTo(counts + c * bins);
  }
}

// x is (rows, n); row r is counted into counts[r][bins] over [lo[r], lo[r] + span[r]].
ONNXQ_STATS_API void onnxq_count_spans(const float* x, int64_t rows, int64_t n, const float* lo, const float* span, int64_t bins,
                       int64_t* counts) {
  SubCounts sub(bins);
  for (int64_t r = 0; r < rows; ++r) {
    const float low = lo[r], width = span[r];
    sub.Count(x + r * n, n, SpanBin{low, width, static_cast<int32_t>(bins)});
    sub.AddTo(counts + r * bins);
  }
}

}  // extern "C"
