// PostConv/IntConv: W decoded and prepared for the kernels, and the scalar reference kernel that
// defines the ops' semantics (int_conv.h) in direct loops.
#include <math.h>  // INFINITY

#include <algorithm>
#include <string>
#include <utility>

#include "kernels/int_conv_impl.h"
#include "kernels/int_conv_kernels.h"
#include "kernels/kernels.h"

namespace onnxq::iconv {

namespace {

// Code k of a packed row of W: a 4-bit two's-complement nibble (bits <= 4) or an int8.
inline int32_t CodeAt(const uint8_t* row, int64_t k, bool nibbles) {
  if (!nibbles) return static_cast<int8_t>(row[k]);
  const int32_t v = (k & 1) ? row[k >> 1] >> 4 : row[k >> 1] & 15;
  return v >= 8 ? v - 16 : v;
}

// PostConv: the integer weight a code q stands for, sign * 2^shift, counted in acc_e (odd = false)
// or acc_o (odd = true); sign 0 for q = 0. See int_conv.h.
struct PostWeight {
  int32_t sign, shift;
  bool odd;
};

inline PostWeight PostWeightOf(int32_t q, int64_t bits) {
  const int32_t mx = (1 << (bits - 1)) - 1;  // largest index M
  const int32_t k2 = mx / 2;                 // ceil((M - 1) / 2) for odd M
  const int32_t index = q < 0 ? -q : q;
  if (index == 0) return {0, 0, false};
  const int32_t e = mx - index;
  if (e % 2 == 0) return {q < 0 ? -1 : 1, k2 - e / 2, false};
  return {q < 0 ? -1 : 1, k2 - (e - 1) / 2, true};
}

// PackedWeights::pair_start, pair_tap, pair_weights from the lists: along each kernel row, every
// nonzero weight starts a pair with the tap after it (zero or not), which is then skipped. Greedy
// from the left is optimal here (runs of nonzero taps in a row: ceil(run / 2) pairs each).
void SparsePairs(const Geometry& g, PackedWeights& pw) {
  pw.pair_start.assign(1, 0);
  std::vector<int32_t> row(static_cast<size_t>(g.kw + 1));
  for (int64_t list = 0; list < 2 * g.m; ++list) {
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      std::fill(row.begin(), row.end(), 0);
      for (int64_t i = pw.list_start[list]; i < pw.list_start[list + 1]; ++i) {
        if (pw.taps[i] / g.kw == ky) row[pw.taps[i] % g.kw] = pw.weights[i];
      }
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        if (row[kx] == 0) continue;
        const auto byte = [](int32_t w) { return static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(w))); };
        pw.pair_tap.push_back(static_cast<int32_t>(ky * g.kw + kx));
        pw.pair_weights.push_back(static_cast<int32_t>((byte(row[kx]) | byte(row[kx + 1]) << 8) * 0x10001u));
        ++kx;
      }
    }
    pw.pair_start.push_back(static_cast<int64_t>(pw.pair_tap.size()));
  }
}

// The largest |code|.
int32_t MaxAbs(const std::vector<int8_t>& codes) {
  int32_t largest = 0;
  for (const int8_t q : codes) largest = std::max(largest, std::abs(static_cast<int32_t>(q)));
  return largest;
}

}  // namespace

bool UsesTapQuads(const Geometry& g, Isa isa) {
  return isa != Isa::kScalar && g.group == 1 && g.cg == 1 && g.kh >= 2;
}

int64_t TapQuadRows(const Geometry& g) { return (g.oh - 1) * g.sh + ((g.kh + 3) / 4 - 1) * 4 * g.dh + 1; }

Geometry TapQuadGeometry(const Geometry& g) {
  Geometry t = g;
  t.c = t.cg = 4;
  t.h = TapQuadRows(g);
  t.pt = 0;
  t.kh = (g.kh + 3) / 4;
  t.dh = 4 * g.dh;
  t.k = 4 * t.kh * t.kw;
  return t;
}

// Rows of A: IntConv, one per output channel; PostConv, two per output channel, 2*mm (w_even) and
// 2*mm + 1 (w_odd).
std::shared_ptr<const PackedWeights> Prepare(const Geometry& g, const uint8_t* w, int64_t row_bytes, int64_t bits,
                                             bool post, Isa isa) {
  auto pw = std::make_shared<PackedWeights>();
  pw->k = g.k;
  const bool nibbles = bits <= 4;
  const int32_t max_index = (1 << (bits - 1)) - 1;
  pw->codes.resize(static_cast<size_t>(g.m * g.k));
  for (int64_t m = 0; m < g.m; ++m) {
    for (int64_t k = 0; k < g.k; ++k) {
      const int32_t q = CodeAt(w + m * row_bytes, k, nibbles);
      if (post && (q > max_index || q < -max_index)) {
        throw InvalidArgument("PostConv: code " + std::to_string(q) + " at W[" + std::to_string(m) + ", code " +
                              std::to_string(k) + "] is out of range for " + std::to_string(bits) +
                              "-bit POST codes (|q| <= " + std::to_string(max_index) + ")");
      }
      pw->codes[m * g.k + k] = static_cast<int8_t>(q);
    }
  }
  if (isa == Isa::kScalar) return pw;

  // The integer weight(s) of code k of output channel m: (row 0 or 1, weight); row 1 is w_odd.
  auto weight_of = [&](int64_t m, int64_t k) -> std::pair<int64_t, int32_t> {
    const int32_t q = pw->codes[m * g.k + k];
    if (!post) return {0, q};
    const PostWeight pwt = PostWeightOf(q, bits);
    return {pwt.odd ? 1 : 0, pwt.sign * (1 << pwt.shift)};
  };
  if (g.cg == 1 && !UsesTapQuads(g, isa)) {
    pw->mode = Mode::kDepthwise;
    pw->list_start.assign(1, 0);
    pw->list_sum.assign(static_cast<size_t>(2 * g.m), 0);
    pw->list_narrow.assign(static_cast<size_t>(2 * g.m), 0);
    for (int64_t m = 0; m < g.m; ++m) {
      for (int64_t list = 0; list < 2; ++list) {
        int32_t magnitude = 0;  // sum |w|
        for (int64_t k = 0; k < g.k; ++k) {
          const auto [row, weight] = weight_of(m, k);
          if (row != list || weight == 0) continue;
          pw->taps.push_back(static_cast<int32_t>(k));
          pw->weights.push_back(weight);
          pw->list_sum[2 * m + list] += weight;
          magnitude += std::abs(weight);
        }
        pw->list_start.push_back(static_cast<int64_t>(pw->taps.size()));
        pw->list_narrow[2 * m + list] = magnitude <= kInt16WeightBudget;
      }
    }
    // DepthwiseLanes' dense weights, where it applies: one output per input channel, int16 sums.
    const bool narrow = std::all_of(pw->list_narrow.begin(), pw->list_narrow.end(), [](uint8_t v) { return v != 0; });
    if (g.mg == 1 && narrow) {
      const int64_t taps = g.kh * g.kw;
      pw->lane_weights.assign(static_cast<size_t>(RoundUp(g.m, 16) * 2 * taps), 0);
      for (int64_t m = 0; m < g.m; ++m) {
        for (int64_t list = 0; list < 2; ++list) {
          for (int64_t i = pw->list_start[2 * m + list]; i < pw->list_start[2 * m + list + 1]; ++i) {
            const int64_t index = ((m / 16 * 2 + list) * taps + pw->taps[i]) * 16 + m % 16;
            pw->lane_weights[index] = static_cast<int16_t>(pw->weights[i]);
          }
        }
      }
    }
    // DepthwiseFused's dense weights: taps side by side in groups of 4 (int8 in an int32) and of 2
    // (int8 in an int16, where every list is narrow).
    const int64_t kw4 = (g.kw + 3) / 4, kw2 = (g.kw + 1) / 2;
    pw->quads.assign(static_cast<size_t>(g.m * 2 * g.kh * kw4), 0);
    if (narrow) pw->pairs.assign(static_cast<size_t>(g.m * 2 * g.kh * kw2), 0);
    for (int64_t m = 0; m < g.m; ++m) {
      for (int64_t list = 0; list < 2; ++list) {
        for (int64_t i = pw->list_start[2 * m + list]; i < pw->list_start[2 * m + list + 1]; ++i) {
          const int64_t ky = pw->taps[i] / g.kw, kx = pw->taps[i] % g.kw;
          const auto byte = static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(pw->weights[i])));
          auto& quad = pw->quads[static_cast<size_t>(((m * 2 + list) * g.kh + ky) * kw4 + kx / 4)];
          quad = static_cast<int32_t>(static_cast<uint32_t>(quad) | byte << (8 * (kx % 4)));
          if (narrow) pw->pairs[static_cast<size_t>(((m * 2 + list) * g.kh + ky) * kw2 + kx / 2)] |= byte << (8 * (kx % 2));
        }
      }
    }
    if (narrow) SparsePairs(g, *pw);
    if (g.mg == 1) {
      const int64_t groups = g.kh * kw4, groups2 = g.kh * kw2;
      pw->lane_quads.assign(static_cast<size_t>(RoundUp(g.m, 16) * 2 * groups), 0);
      if (narrow) pw->lane_pairs.assign(static_cast<size_t>(RoundUp(g.m, 16) * 2 * groups2), 0);
      for (int64_t m = 0; m < g.m; ++m) {
        for (int64_t list = 0; list < 2; ++list) {
          for (int64_t t = 0; t < groups; ++t) {
            pw->lane_quads[static_cast<size_t>(((m / 16 * 2 + list) * groups + t) * 16 + m % 16)] =
                pw->quads[static_cast<size_t>((m * 2 + list) * groups + t)];
          }
          for (int64_t t = 0; narrow && t < groups2; ++t) {
            pw->lane_pairs[static_cast<size_t>(((m / 16 * 2 + list) * groups2 + t) * 16 + m % 16)] =
                static_cast<int16_t>(pw->pairs[static_cast<size_t>((m * 2 + list) * groups2 + t)]);
          }
        }
      }
    }
    // Only the scalar kernel reads the codes, and per-pixel steps with one input channel (ReferencePixels:
    // M codes; int_conv.h).
    if (g.group != 1) std::vector<int8_t>().swap(pw->codes);
    return pw;
  }
  pw->mode = Mode::kQuad;
  pw->tap_quads = UsesTapQuads(g, isa);
  pw->c4 = (g.cg + 3) / 4;
  pw->k4 = g.kh * g.kw * pw->c4;
  if (pw->tap_quads) pw->k4 = (g.kh + 3) / 4 * g.kw;  // (c4 is 1)
  pw->rows = post ? 2 * g.mg : g.mg;
  pw->rows_pad = RoundUp(pw->rows, kRows);
  const int64_t group_size = pw->rows_pad * pw->k4 * 4;
  pw->a.assign(static_cast<size_t>(g.group * group_size), 0);
  pw->row_sum.assign(static_cast<size_t>(g.group * pw->rows_pad), 0);
  const bool int16_sums = KernelsFor(isa).int16_sums;
  // vpmaddubsw's int16 sums are exact while a lane's sums of positive w and of negative |w| each stay within
  // kInt16WeightBudget (128). With every |w| <= 8, runs of 8 blocks of k or more fit (Int16Runs); with |w| <= 64 (7-bit codes, or 8-bit ones that happen
  // to stay there) one block alone always fits, and each block is widened at once (`wide`); larger weights are
  // split into two parts of |w| <= 8 (Gemm::a_hi).
  const int32_t largest = MaxAbs(pw->codes);
  const bool split = int16_sums && !post && largest > kInt16WeightBudget / 2;
  pw->wide = int16_sums && !split && largest > 8;
  pw->rows16 = RoundUp(pw->rows, kLanes);
  const int64_t group16_size = pw->rows16 * pw->k4 * 4;
  if (!split) pw->a16.assign(static_cast<size_t>(g.group * group16_size), 0);
  for (int64_t gi = 0; gi < g.group; ++gi) {
    for (int64_t mm = 0; mm < g.mg; ++mm) {
      for (int64_t k = 0; k < g.k; ++k) {
        const auto [odd, weight] = weight_of(gi * g.mg + mm, k);
        if (weight == 0) continue;
        const int64_t row = post ? 2 * mm + odd : mm;
        const int64_t c = k / (g.kh * g.kw), ky = k / g.kw % g.kh, kx = k % g.kw;
        // k in the quad order: channel quads, or (tap quads: c is 0) quads of kernel rows 4*ky' + j
        const int64_t kk = pw->tap_quads ? (ky / 4 * g.kw + kx) * 4 + ky % 4
                                         : ((c / 4 * g.kh + ky) * g.kw + kx) * 4 + c % 4;
        const int64_t index = gi * group_size + ((row / kRows * pw->k4 + kk / 4) * kRows + row % kRows) * 4 + kk % 4;
        pw->a[index] = static_cast<int8_t>(weight);
        pw->row_sum[gi * pw->rows_pad + row] += weight;
        if (!split) {
          pw->a16[gi * group16_size + ((row / kLanes * pw->k4 + kk / 4) * kLanes + row % kLanes) * 4 + kk % 4] =
              static_cast<int8_t>(weight);
        }
      }
    }
  }
  if (split) {
    pw->a_hi.resize(pw->a.size());
    for (size_t i = 0; i < pw->a.size(); ++i) {
      const int32_t v = pw->a[i];
      const int32_t lo = ((v + 8) & 15) - 8;
      pw->a[i] = static_cast<int8_t>(lo);
      pw->a_hi[i] = static_cast<int8_t>((v - lo) / 16);
    }
  }
  if (int16_sums && !split && !pw->wide) {
    pw->runs.resize(pw->a.size() / (kRows * 4));
    Int16Runs(pw->a.data(), g.group * pw->rows_pad / kRows, pw->k4, kRows, pw->runs.data());
    pw->runs16.resize(pw->a16.size() / (kLanes * 4));
    Int16Runs(pw->a16.data(), g.group * pw->rows16 / kLanes, pw->k4, kLanes, pw->runs16.data());
  }
  std::vector<int8_t>().swap(pw->codes);  // only the scalar kernel reads the codes
  return pw;
}

void Int16Runs(const int8_t* a, int64_t blocks, int64_t k4, int64_t block_rows, int32_t* runs) {
  // A lane's sum over a run lies in [-255 * (sum of its negative |w|), 255 * (sum of its positive w)] (x in
  // [0, 255]), so it is exact (vpaddw wraps: only the final sum must fit) while each of the two stays within the
  // budget: where the signs are mixed, runs up to twice as long as with a budget on the sum of |w| (fewer
  // widenings into C: the forced-AVX2 ResNet-20 1.4 % faster at batch 1, GemmT's runs about 25 blocks of k).
  // taken(..).sign[s]: what lane (row r, pair j) takes of sign s (0 positive, 1 negative) at block i of k.
  struct Taken {
    int32_t sign[2];
  };
  auto taken = [&](const int8_t* block, int64_t i, int64_t lane) {
    const int8_t* w = block + (i * block_rows + lane / 2) * 4 + 2 * (lane % 2);
    Taken t{{0, 0}};
    for (int j = 0; j < 2; ++j) t.sign[w[j] < 0] += std::abs(static_cast<int32_t>(w[j]));
    return t;
  };
  std::vector<int32_t> sums(static_cast<size_t>(4 * block_rows));  // lane's sign s at 2 * lane + s
  // Whether every lane's sums take block i of k within the budget.
  auto fits = [&](const int8_t* block, int64_t i) {
    for (int64_t lane = 0; lane < 2 * block_rows; ++lane) {
      const Taken t = taken(block, i, lane);
      for (int s = 0; s < 2; ++s) {
        if (sums[2 * lane + s] + t.sign[s] > kInt16WeightBudget) return false;
      }
    }
    return true;
  };
  // Block i of k into every lane's sums (direction 1) or out of them (-1).
  auto move = [&](const int8_t* block, int64_t i, int32_t direction) {
    for (int64_t lane = 0; lane < 2 * block_rows; ++lane) {
      const Taken t = taken(block, i, lane);
      for (int s = 0; s < 2; ++s) sums[2 * lane + s] += direction * t.sign[s];
    }
  };
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* block = a + b * k4 * block_rows * 4;
    std::fill(sums.begin(), sums.end(), 0);
    int64_t end = 0;  // the sums hold blocks [i, end) of k
    for (int64_t i = 0; i < k4; ++i) {
      for (; end < k4 && fits(block, end); ++end) move(block, end, 1);
      if (end == i) {  // (one block alone exceeds the limit: only with |w| > 64, which never comes here)
        runs[b * k4 + i] = 1;
        ++end;
        continue;
      }
      runs[b * k4 + i] = static_cast<int32_t>(end - i);
      move(block, i, -1);
    }
  }
}

void ReferenceConv(const Geometry& g, const PackedWeights& pw, bool post, int64_t bits, const uint8_t* xq, int32_t z,
                   const float* c_e, const float* c_o, const float* bias, float clip_lo, float clip_hi, float* y,
                   const Output* output) {
  if (output != nullptr) {  // Finish's clip left to OutputOne, after the residual
    clip_lo = -INFINITY;
    clip_hi = INFINITY;
  }
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t m = 0; m < g.m; ++m) {
      const int64_t first_channel = m / g.mg * g.cg;
      const int8_t* q = pw.codes.data() + m * g.k;
      for (int64_t oy = 0; oy < g.oh; ++oy) {
        for (int64_t ox = 0; ox < g.ow; ++ox) {
          int32_t sum_e = 0, sum_o = 0;  // sum_k x_q * w
          int32_t w_e = 0, w_o = 0;      // sum_k w
          for (int64_t c = 0; c < g.cg; ++c) {
            const uint8_t* plane = xq + ((n * g.c) + first_channel + c) * g.h * g.w;
            for (int64_t ky = 0; ky < g.kh; ++ky) {
              for (int64_t kx = 0; kx < g.kw; ++kx) {
                const int64_t iy = oy * g.sh - g.pt + ky * g.dh, ix = ox * g.sw - g.pl + kx * g.dw;
                const bool inside = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
                const int32_t x = inside ? plane[iy * g.w + ix] : z;  // padding holds z_x
                const int32_t code = q[(c * g.kh + ky) * g.kw + kx];
                if (!post) {
                  sum_e += x * code;
                  w_e += code;
                  continue;
                }
                const PostWeight pwt = PostWeightOf(code, bits);  // w = sign * 2^shift: a shift
                if (pwt.sign == 0) continue;
                const int32_t shifted = pwt.sign > 0 ? (x << pwt.shift) : -(x << pwt.shift);
                const int32_t weight = pwt.sign > 0 ? (1 << pwt.shift) : -(1 << pwt.shift);
                if (pwt.odd) {
                  sum_o += shifted;
                  w_o += weight;
                } else {
                  sum_e += shifted;
                  w_e += weight;
                }
              }
            }
          }
          const int32_t acc_e = sum_e - z * w_e, acc_o = sum_o - z * w_o;
          const int64_t at = ((n * g.m + m) * g.oh + oy) * g.ow + ox;
          const float value =
              Finish(post, acc_e, acc_o, c_e[m], c_o[m], bias != nullptr ? bias + m : nullptr, clip_lo, clip_hi);
          if (output != nullptr) {
            OutputOne(*output, value, at);
          } else {
            y[at] = value;
          }
        }
      }
    }
  }
}

void ReferencePixels(const Geometry& g, const PackedWeights& pw, const uint8_t* xq, const int32_t* z, const float* s,
                     const float* scale, const float* bias, float clip_lo, float clip_hi, float* y,
                     const Output* output) {
  if (output != nullptr) {  // Finish's clip left to OutputOne, after the residual
    clip_lo = -INFINITY;
    clip_hi = INFINITY;
  }
  const int64_t pixels = g.h * g.w;
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t m = 0; m < g.m; ++m) {
      const int8_t* q = pw.codes.data() + m * g.k;
      for (int64_t p = 0; p < pixels; ++p) {
        const int64_t i = n * pixels + p;
        int32_t sum = 0, w = 0;  // sum_k x_q * q, sum_k q
        for (int64_t c = 0; c < g.c; ++c) {
          sum += static_cast<int32_t>(xq[(n * g.c + c) * pixels + p]) * q[c];
          w += q[c];
        }
        const float c_x = s[i] * scale[m];  // s_x * scale[m]
        const float value = Finish(false, sum - z[i] * w, 0, c_x, 0.0f, bias != nullptr ? bias + m : nullptr, clip_lo,
                                   clip_hi);
        const int64_t at = (n * g.m + m) * pixels + p;
        if (output != nullptr) {
          OutputOne(*output, value, at);
        } else {
          y[at] = value;
        }
      }
    }
  }
}

}  // namespace onnxq::iconv
