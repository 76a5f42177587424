// PostConv/IntConv's matrix products (int_conv_kernels.h: Gemm, GemmT), written once over an
// instruction set's traits T (simd_kernels.h). Both sum uint8 activations times int8 weights in
// blocks of 4 k with T::AddProducts:
//   - AVX-512 VNNI: vpdpbusd adds the four products straight into an int32 lane, exact for any int8
//     weight; the sums stay in registers over all of k.
//   - AVX2 (T::kInt16Sums): vpmaddubsw adds each pair of products into int16 with saturation, exact
//     for |w| <= 8 (2*255*8 = 4080), and vpaddw sums them in int16 for as many blocks as the weights
//     allow (Int16Runs: at least 8), after which T::Widen (vpmaddwd with ones) widens them into the
//     int32 sums in C, kept in memory (L1) to leave the registers to the int16 sums. k runs in cache
//     chunks (Gemm::chunk). Weights with |w| <= 64 but not all <= 8 (`wide`: 5-7-bit codes) fill the
//     int16 budget in a block or two, so each block's pair sums are widened at once (vpmaddwd with
//     ones) into int32 sums kept in registers, as vpdpbusd would. Wider weights (8-bit codes past 64)
//     come split as w = 16*hi + lo with |hi|, |lo| <= 8: two exact streams, the high one widened
//     times 16.
// Integer sums are exact in any order, so every instruction set gives the same C.
#pragma once

#include <cstdint>

#include "kernels/int_conv_kernels.h"

namespace onnxq::iconv {

namespace {

inline int64_t MinOf(int64_t a, int64_t b) { return a < b ? a : b; }

// acc + the products of block x, w (4 k) in int32 lanes: AddProducts where it sums into int32 (VNNI),
// else (kWide, T::kInt16Sums) the int16 pair sums widened at once.
template <class T, bool kWide>
inline typename T::I AddBlock(typename T::I acc, typename T::I x, typename T::I w) {
  if constexpr (kWide) {
    return T::Add32(acc, T::Widen(T::Products(x, w)));
  } else {
    return T::AddProducts(acc, x, w);
  }
}

// Rows [0, kRows) of one row block of A times kVectors * T::kFloats pixels of B from b, over blocks
// [0, k4) of k (A and B as int_conv_kernels.h lays them out, offsets[i] locating block i of B), into
// C (added to what it holds if `add`). T::kInt16Sums: the sums are widened after runs[i] blocks from
// block i (Int16Runs), or (kWide) every block, into int32 sums in registers. start (int32 sums, not
// add): row r's sums begin at start[r] (Gemm::start), else at 0.
template <class T, int kVectors, bool kWide = false>
void GemmTile(const int8_t* a, int64_t k4, const uint8_t* b, const int64_t* offsets, const int32_t* runs, bool add,
              int32_t* c, const int32_t* start = nullptr) {
  using I = typename T::I;
  for (int64_t i0 = 0, i1; i0 < k4; i0 = i1) {
    i1 = k4;
    if constexpr (T::kInt16Sums && !kWide) i1 = MinOf(i0 + runs[i0], k4);
    I sum[kRows][kVectors];
    for (int r = 0; r < kRows; ++r) {
      const I first = !T::kInt16Sums && start != nullptr ? T::Set32(start[r]) : T::Zero();
      for (auto& v : sum[r]) v = first;
    }
    for (int64_t i = i0; i < i1; ++i) {
      I x[kVectors];
      for (int v = 0; v < kVectors; ++v) x[v] = T::Load(b + offsets[i] + T::kBytes * v);
      for (int r = 0; r < kRows; ++r) {
        const I w = T::Broadcast4(a + (i * kRows + r) * 4);
        for (int v = 0; v < kVectors; ++v) sum[r][v] = AddBlock<T, kWide>(sum[r][v], x[v], w);
      }
      if constexpr (T::kPinSums) {
        for (auto& row : sum) {
          for (auto& v : row) T::Pin(v);
        }
      }
    }
    for (int r = 0; r < kRows; ++r) {
      for (int v = 0; v < kVectors; ++v) {
        int32_t* out = c + r * kPanel + T::kFloats * v;
        const I wide = kWide ? sum[r][v] : T::Widen(sum[r][v]);
        T::Store(out, add || i0 > 0 ? T::Add32(T::Load(out), wide) : wide);
      }
    }
  }
}

// GemmTile for split weights A = 16 * a_hi + a_lo (T::kInt16Sums only), T::kFloats pixels, the
// int16 sums widened every 8 blocks of k (|a_hi|, |a_lo| <= 8).
template <class T>
void GemmTileSplit(const int8_t* a_lo, const int8_t* a_hi, int64_t k4, const uint8_t* b, const int64_t* offsets,
                   bool add, int32_t* c) {
  static_assert(T::kInt16Sums, "split weights are for int16 sums");
  using I = typename T::I;
  constexpr int64_t kRun = 8;
  for (int64_t i0 = 0; i0 < k4; i0 += kRun) {
    const int64_t i1 = MinOf(i0 + kRun, k4);
    I lo[kRows], hi[kRows];
    for (int r = 0; r < kRows; ++r) lo[r] = hi[r] = T::Zero();
    for (int64_t i = i0; i < i1; ++i) {
      const I x = T::Load(b + offsets[i]);
      for (int r = 0; r < kRows; ++r) {
        lo[r] = T::AddProducts(lo[r], x, T::Broadcast4(a_lo + (i * kRows + r) * 4));
        hi[r] = T::AddProducts(hi[r], x, T::Broadcast4(a_hi + (i * kRows + r) * 4));
      }
    }
    for (int r = 0; r < kRows; ++r) {
      int32_t* out = c + r * kPanel;
      const I wide = T::Add32(T::WidenTimes16(hi[r]), T::Widen(lo[r]));
      T::Store(out, add || i0 > 0 ? T::Add32(T::Load(out), wide) : wide);
    }
  }
}

// The last pixels of a row block: `vectors` (< kVectors) vectors of them, as one tile.
template <class T, int kVectors, bool kWide = false>
void GemmTileRest(int64_t vectors, const int8_t* a, int64_t k4, const uint8_t* b, const int64_t* offsets,
                  const int32_t* runs, bool add, int32_t* c, const int32_t* start = nullptr) {
  if constexpr (kVectors > 1) {
    if (vectors == kVectors - 1) return GemmTile<T, kVectors - 1, kWide>(a, k4, b, offsets, runs, add, c, start);
    GemmTileRest<T, kVectors - 1, kWide>(vectors, a, k4, b, offsets, runs, add, c, start);
  }
}

// Gemm: chunks of k (T::kInt16Sums; else all of k at once), row blocks, tiles of T::kGemmVectors
// vectors of pixels.
template <class T>
void GemmKernel(const Gemm& g) {
  constexpr int64_t kTile = T::kGemmVectors * T::kFloats;  // pixels
  const int64_t chunk = T::kInt16Sums ? g.chunk : g.k4;
  for (int64_t i0 = 0; i0 < g.k4; i0 += chunk) {
    const int64_t n = MinOf(chunk, g.k4 - i0);
    const int64_t* offsets = g.b_offsets + i0;
    for (int64_t rb = 0; rb < g.rows / kRows; ++rb) {
      int32_t* c = g.c + rb * kRows * kPanel;
      const int64_t a0 = rb * g.k4 * kRows * 4 + i0 * kRows * 4;  // A's block rb, from block i0 of k
      if constexpr (T::kInt16Sums) {
        if (g.a_hi != nullptr) {
          for (int64_t p = 0; p < g.pixels; p += T::kFloats) {
            GemmTileSplit<T>(g.a + a0, g.a_hi + a0, n, g.b + 4 * p, offsets, i0 > 0, c + p);
          }
          continue;
        }
      }
      if constexpr (T::kInt16Sums) {
        if (g.wide) {
          int64_t p = 0;
          for (; p + kTile <= g.pixels; p += kTile) {
            GemmTile<T, T::kGemmVectors, true>(g.a + a0, n, g.b + 4 * p, offsets, nullptr, i0 > 0, c + p);
          }
          GemmTileRest<T, T::kGemmVectors, true>((g.pixels - p) / T::kFloats, g.a + a0, n, g.b + 4 * p, offsets,
                                                 nullptr, i0 > 0, c + p);
          continue;
        }
      }
      const int32_t* runs = T::kInt16Sums ? g.runs + rb * g.k4 + i0 : nullptr;
      const int32_t* start = !T::kInt16Sums && g.start != nullptr ? g.start + rb * kRows : nullptr;
      int64_t p = 0;
      for (; p + kTile <= g.pixels; p += kTile) {
        GemmTile<T, T::kGemmVectors>(g.a + a0, n, g.b + 4 * p, offsets, runs, i0 > 0, c + p, start);
      }
      GemmTileRest<T, T::kGemmVectors>((g.pixels - p) / T::kFloats, g.a + a0, n, g.b + 4 * p, offsets, runs, i0 > 0,
                                       c + p, start);
    }
  }
}

// GemmT's sums: kBlocks blocks of kLanes rows (A in GemmT's layout, from a) times kPixels pixels from
// p0, over blocks [i0, end) of k, added to sum[p * kVectors + v] (pixel p, the tile's vector v: see
// GemmTTile). The rows are in the vector lanes, T::kFloats per vector, each pixel's 4 activations of a
// block broadcast. kAdjacent: the tile's pixels are adjacent (pixel_offsets[p0 + p] = pixel_offsets[p0]
// + 4p), so that every broadcast is at a constant offset from one pointer per block of k (offsets per
// pixel take more registers than there are for wide tiles); else (a tile across the end of an output
// row) each pixel at its own offset. kWide: each block's int16 pair sums widened at once (T::kInt16Sums).
template <class T, int kBlocks, int kPixels, bool kAdjacent, bool kWide>
[[gnu::always_inline]] inline void GemmTSums(const int8_t* a, const GemmT& g, int64_t p0, int64_t i0, int64_t end,
                                             typename T::I* sum) {
  using I = typename T::I;
  constexpr int kVectors = kBlocks * kLanes / T::kFloats;
  // Vector v holds the tile's rows [v * kFloats, (v + 1) * kFloats): block block_of(v)'s from row lane_of(v).
  auto block_of = [](int v) { return v * T::kFloats / kLanes; };
  auto lane_of = [](int v) { return v * T::kFloats % kLanes; };
  const uint8_t* b = g.b + (kAdjacent ? g.pixel_offsets[p0] : 0);
  const int64_t* pixels = g.pixel_offsets + p0;
  for (int64_t i = i0; i < end; ++i) {
    I w[kVectors];
    for (int v = 0; v < kVectors; ++v) {
      w[v] = T::Load(a + ((block_of(v) * g.k4 + i) * kLanes + lane_of(v)) * 4);
      if constexpr (T::kPinWeights) T::Pin(w[v]);
    }
    const uint8_t* bi = b + g.b_offsets[i];
    for (int p = 0; p < kPixels; ++p) {
      const I x = T::Broadcast4(bi + (kAdjacent ? 4 * p : pixels[p]));
      for (int v = 0; v < kVectors; ++v) sum[p * kVectors + v] = AddBlock<T, kWide>(sum[p * kVectors + v], x, w[v]);
    }
    if constexpr (T::kPinSums && kVectors > 1) {
      for (int v = 0; v < kPixels * kVectors; ++v) T::Pin(sum[v]);
    }
  }
}

// GemmT's tile: kBlocks blocks of kLanes rows times kPixels pixels from p0 (GemmTSums), over blocks
// [i0, i1) of k, into C (kVectors = kBlocks * kLanes / T::kFloats vectors of rows per pixel).
// T::kInt16Sums: one block of rows (its runs), the sums widened after each run into C, or (kWide)
// after every block into int32 sums in registers.
template <class T, int kBlocks, int kPixels, bool kAdjacent = true, bool kWide = false>
void GemmTTile(const int8_t* a, const GemmT& g, const int32_t* runs, int64_t p0, int64_t i0, int64_t i1, int32_t* c) {
  static_assert(!T::kInt16Sums || kBlocks == 1, "int16 runs are per block of rows");
  using I = typename T::I;
  constexpr int kVectors = kBlocks * kLanes / T::kFloats;
  auto block_of = [](int v) { return v * T::kFloats / kLanes; };
  auto lane_of = [](int v) { return v * T::kFloats % kLanes; };
  for (int64_t end; i0 < i1; i0 = end) {
    end = i1;
    if constexpr (T::kInt16Sums && !kWide) end = MinOf(i0 + runs[i0], i1);
    I sum[kPixels * kVectors];  // (pixel p, vector v) at p * kVectors + v
    for (auto& v : sum) v = T::Zero();
    GemmTSums<T, kBlocks, kPixels, kAdjacent, kWide>(a, g, p0, i0, end, sum);
    for (int p = 0; p < kPixels; ++p) {
      for (int v = 0; v < kVectors; ++v) {
        int32_t* out = c + (block_of(v) * g.pixels + p0 + p) * kLanes + lane_of(v);
        const I wide = kWide ? sum[p * kVectors + v] : T::Widen(sum[p * kVectors + v]);
        T::Store(out, i0 > 0 ? T::Add32(T::Load(out), wide) : wide);
      }
    }
  }
}

// The last pixels of a row of tiles: `count` (< kPixels) of them, as one tile.
template <class T, int kBlocks, int kPixels, bool kAdjacent = true, bool kWide = false>
void GemmTTileRest(int64_t count, const int8_t* a, const GemmT& g, const int32_t* runs, int64_t p0, int64_t i0,
                   int64_t i1, int32_t* c) {
  if constexpr (kPixels > 1) {
    if (count == kPixels - 1) return GemmTTile<T, kBlocks, kPixels - 1, kAdjacent, kWide>(a, g, runs, p0, i0, i1, c);
    GemmTTileRest<T, kBlocks, kPixels - 1, kAdjacent, kWide>(count, a, g, runs, p0, i0, i1, c);
  }
}

// kBlocks blocks of rows from block rb over blocks [i0, i1) of k, every pixel: tiles of
// T::GemmTPixels(kBlocks) pixels (fewer blocks, more pixels: as many independent sums; kWide:
// T::GemmTWidePixels, as its int32 sums and the constant they are widened with take the registers),
// then one of the pixels left.
template <class T, int kBlocks, bool kWide>
constexpr int GemmTTilePixels() {
  if constexpr (kWide) {
    return T::GemmTWidePixels(kBlocks);
  } else {
    return T::GemmTPixels(kBlocks);
  }
}

template <class T, int kBlocks, bool kWide = false>
void GemmTRows(const GemmT& g, int64_t rb, int64_t i0, int64_t i1) {
  constexpr int kPixels = GemmTTilePixels<T, kBlocks, kWide>();
  const int8_t* a = g.a + rb * g.k4 * kLanes * 4;
  const int32_t* runs = T::kInt16Sums && !kWide ? g.runs + rb * g.k4 : nullptr;
  int32_t* c = g.c + rb * g.pixels * kLanes;
  const int64_t* offsets = g.pixel_offsets;
  int64_t p = 0;
  for (; p + kPixels <= g.pixels; p += kPixels) {  // whole tiles: of adjacent pixels, or (a row's end) any
    if (offsets[p + kPixels - 1] == offsets[p] + 4 * (kPixels - 1)) {
      GemmTTile<T, kBlocks, kPixels, true, kWide>(a, g, runs, p, i0, i1, c);
    } else {
      GemmTTile<T, kBlocks, kPixels, false, kWide>(a, g, runs, p, i0, i1, c);
    }
  }
  if (p < g.pixels && offsets[g.pixels - 1] == offsets[p] + 4 * (g.pixels - 1 - p)) {
    GemmTTileRest<T, kBlocks, kPixels, true, kWide>(g.pixels - p, a, g, runs, p, i0, i1, c);
  } else if (p < g.pixels) {
    GemmTTileRest<T, kBlocks, kPixels, false, kWide>(g.pixels - p, a, g, runs, p, i0, i1, c);
  }
}

// The last row blocks: `blocks` (< kBlocks) of them, as one row of tiles.
template <class T, int kBlocks, bool kWide = false>
void GemmTRowsRest(int64_t blocks, const GemmT& g, int64_t rb, int64_t i0, int64_t i1) {
  if constexpr (kBlocks > 1) {
    if (blocks == kBlocks - 1) return GemmTRows<T, kBlocks - 1, kWide>(g, rb, i0, i1);
    GemmTRowsRest<T, kBlocks - 1, kWide>(blocks, g, rb, i0, i1);
  }
}

// GemmT: chunks of k (T::kInt16Sums; else all of k at once), tiles of T::kGemmTBlocks blocks of
// kLanes rows by T::GemmTPixels(kGemmTBlocks) pixels (the last row blocks: fewer, by more pixels).
template <class T>
void GemmTKernel(const GemmT& g) {
  constexpr int kBlocks = T::kGemmTBlocks;
  const int64_t chunk = T::kInt16Sums ? g.chunk : g.k4;
  const int64_t blocks = g.rows / kLanes;
  for (int64_t i0 = 0; i0 < g.k4; i0 += chunk) {
    const int64_t i1 = MinOf(i0 + chunk, g.k4);
    int64_t rb = 0;
    if constexpr (T::kInt16Sums) {
      if (g.wide) {
        for (; rb + kBlocks <= blocks; rb += kBlocks) GemmTRows<T, kBlocks, true>(g, rb, i0, i1);
        GemmTRowsRest<T, kBlocks, true>(blocks - rb, g, rb, i0, i1);
        continue;
      }
    }
    for (; rb + kBlocks <= blocks; rb += kBlocks) GemmTRows<T, kBlocks>(g, rb, i0, i1);
    GemmTRowsRest<T, kBlocks>(blocks - rb, g, rb, i0, i1);
  }
}

}  // namespace

}  // namespace onnxq::iconv
