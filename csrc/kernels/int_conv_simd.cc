// PostConv/IntConv's SIMD kernels' driver: X laid out by quads of channels and stride phases,
// the integer matrix products over it (or, depthwise, a direct sum over the taps), and the float
// epilogue; tasks spread over onnxruntime's threads. The kernels are those of the call's
// instruction set, from its table (kernels.h).
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "kernels/int_conv_impl.h"
#include "kernels/int_conv_kernels.h"
#include "kernels/kernels.h"

namespace onnxq::iconv {

namespace {

// A convolution with strides (sh, sw) reads every sh-th row and sw-th column of the padded input.
// Split into sh*sw phase planes by (y % sh, x % sw), each hq x wq pixels, the input pixel of
// output (oy, ox) and tap (ky, kx) is at Index(ky*dh, kx*dw) + oy*wq + ox: with the matrix column
// p = oy*wq + ox every tap reads a contiguous range of its plane (columns with ox >= OW are
// computed and dropped). Stride 1 is a single plane, the padded input itself.
struct Phases {
  int64_t sh = 1, sw = 1, hq = 0, wq = 0;
  int64_t plane() const { return hq * wq; }
  int64_t size() const { return sh * sw * plane(); }
  int64_t Index(int64_t y, int64_t x) const { return ((y % sh) * sw + x % sw) * plane() + (y / sh) * wq + x / sw; }
  // Index(y, 0) for y = y0, y0 + 1, ...: one division for all rows.
  struct Rows {
    const Phases& ph;
    int64_t phase, row;
    int64_t operator*() const { return phase * ph.sw * ph.plane() + row * ph.wq; }
    void operator++() {
      if (++phase == ph.sh) {
        phase = 0;
        ++row;
      }
    }
  };
  Rows RowsFrom(int64_t y0) const { return Rows{*this, y0 % sh, y0 / sh}; }
};

// Scatter pixels x0 .. x0 + count - 1 of a padded row (T: one byte, or a quad of 4) into the phase
// planes, where `row` is the row's start in its phase plane: pixel x goes to row[ph.Index(0, x)].
template <typename T>
void ScatterRow(const Phases& ph, const T* src, int64_t count, int64_t x0, T* row) {
  if (count == 0) return;  // (src may be null: an empty row's data)
  if (ph.sw == 1) {
    std::memcpy(row + x0, src, static_cast<size_t>(count) * sizeof(T));
    return;
  }
  if (ph.sw == 2) {  // even pixels (of src) to one plane, odd ones to the other
    T* even = row + (x0 % 2) * ph.plane() + x0 / 2;
    T* odd = row + ((x0 + 1) % 2) * ph.plane() + (x0 + 1) / 2;
    int64_t i = 0;
#ifdef __SSE2__
    if constexpr (sizeof(T) == 1) {
      const __m128i low = _mm_set1_epi16(0x00FF);
      for (; i + 32 <= count; i += 32) {
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(even + i / 2),
                         _mm_packus_epi16(_mm_and_si128(a, low), _mm_and_si128(b, low)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(odd + i / 2),
                         _mm_packus_epi16(_mm_srli_epi16(a, 8), _mm_srli_epi16(b, 8)));
      }
      for (; i + 16 <= count; i += 16) {
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(even + i / 2), _mm_packus_epi16(_mm_and_si128(a, low), a));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(odd + i / 2), _mm_packus_epi16(_mm_srli_epi16(a, 8), a));
      }
    } else {
      for (; i + 8 <= count; i += 8) {
        const __m128 a = _mm_loadu_ps(reinterpret_cast<const float*>(src + i));
        const __m128 b = _mm_loadu_ps(reinterpret_cast<const float*>(src + i + 4));
        _mm_storeu_ps(reinterpret_cast<float*>(even + i / 2), _mm_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
        _mm_storeu_ps(reinterpret_cast<float*>(odd + i / 2), _mm_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
      }
    }
#endif
    for (; i < count; ++i) (i % 2 == 0 ? even : odd)[i / 2] = src[i];
    return;
  }
  int64_t phase = x0 % ph.sw, column = x0 / ph.sw;
  for (int64_t i = 0; i < count; ++i) {
    row[phase * ph.plane() + column] = src[i];  // (x0 + i) % sw, (x0 + i) / sw
    if (++phase == ph.sw) {
      phase = 0;
      ++column;
    }
  }
}

// The slack (in pixels) after the phase images: kernels read whole vectors of 16 columns.
constexpr int64_t kSlack = 64;

// A call's tables, reused from call to call by the thread that lays them out (SimdConv): their
// vectors were allocated and freed on every call (with the op's own, about a fifth of a small layer's
// fixed cost). SimdJob's members of the same names refer to them.
struct JobTables {
  std::vector<int64_t> offsets, tap_offsets, lane_offsets, starts;
  std::vector<int32_t> lane_z, fused_z, t_z, gemm_start;
  std::vector<float> lane_factors, t_factor;
  std::vector<uint8_t> keep;
  std::vector<FusedPair> fused_pairs;
  bool busy = false;
  void Clear() {  // (keeps their memory)
    offsets.clear();
    tap_offsets.clear();
    lane_offsets.clear();
    starts.clear();
    lane_z.clear();
    fused_z.clear();
    t_z.clear();
    gemm_start.clear();
    lane_factors.clear();
    t_factor.clear();
    keep.clear();
    fused_pairs.clear();
  }
};

// A call's arguments and how its work is laid out.
struct SimdJob : SimdArgs {
  explicit SimdJob(JobTables& t)
      : offsets(t.offsets), tap_offsets(t.tap_offsets), lane_offsets(t.lane_offsets), lane_z(t.lane_z),
        lane_factors(t.lane_factors), keep(t.keep), starts(t.starts), fused_z(t.fused_z), fused_pairs(t.fused_pairs),
        t_z(t.t_z), t_factor(t.t_factor), gemm_start(t.gemm_start) {}
  const Kernels* kernels = nullptr;  // KernelsFor(isa)
  Phases ph;
  const uint8_t* x4 = nullptr;   // kQuad: [N][group][c4][ph.size()][4], padded with z
  std::vector<int64_t>& offsets;  // kQuad: [k4] byte offsets in an image; kDepthwise: [kh*kw]
  std::vector<int64_t>& tap_offsets;  // kDepthwise: the offset of each entry of pw->taps
  // kDepthwise by DepthwiseLanes: blocks of 16 channels, the padded image's size, the taps'
  // offsets, and the per-channel constants padded to whole blocks.
  bool lanes = false;
  bool lanes_fused = false;  // LanesFused (from the float input, like fused)
  int64_t blocks = 0, hp = 0, wp = 0;
  std::vector<int64_t>& lane_offsets;
  std::vector<int32_t>& lane_z;     // [2][M16]: z_e, z_o
  std::vector<float>& lane_factors;  // [3][M16]: c_e, c_o, bias
  // kDepthwise by DepthwiseFused: the padded plane's size, which columns are outputs (see
  // DepthwiseFused), the tap groups' offsets and weights, z_x * each list's sum of weights.
  bool fused = false;
  std::vector<uint8_t>& keep;
  std::vector<int64_t>& starts;
  std::vector<int32_t>& fused_z;  // [2][M]: z_e, z_o
  const std::vector<int32_t>* fused_weights = nullptr;  // AVX-512: the tap groups' weights
  std::vector<FusedPair>& fused_pairs;                    // AVX2: pw->pair_tap's offsets and weights
  float inverse = 0.0f;
  bool transposed;               // GemmT over output pixels (no dropped columns), else Gemm
  // GemmT's epilogue (FinishT): z_x * each row's sum of weights and its factor, [group][t_rows].
  int64_t t_rows = 0;
  std::vector<int32_t>& t_z;
  std::vector<float>& t_factor;
  // What the kernels read of t_z, t_factor, lane_z and lane_factors: those vectors' data, or the node's
  // kept tables (SimdArgs::tables).
  const int32_t *t_z_at = nullptr, *lane_z_at = nullptr;
  const float *t_factor_at = nullptr, *lane_factors_at = nullptr;
  // Gemm into an Output with int32 sums (VNNI), no per-pixel steps: -z_x * each row's sum of weights,
  // [group][rows_pad], where the sums start (Gemm::start); else empty.
  std::vector<int32_t>& gemm_start;
  int64_t cols;                  // matrix columns per output row (wq; OW for GemmT)
  int64_t span;                  // matrix columns per image and group: (OH - 1) * cols + OW
  int64_t panels;                // panels of `panel` columns per image and group
  int64_t panel = kPanel;        // Gemm: kPanel; GemmT: a multiple of it, or the image (see SimdConv)
  int64_t channels;              // kDepthwise: input channels per task
  int64_t chunk;                 // kQuad: blocks of 4 k per cache chunk of the AVX2 kernels
  std::atomic<bool> failed{false};
};

// What a thread's reused buffer (ThreadBuffer) holds: one buffer per use, as a task may hold
// several at once (RunDepthwise: its plane and its staged floats; SimdConv: the picked pixels of a
// strided 1x1 while its quad image is built).
enum class Use {
  kPicked, kTapRows, kQuadImage, kRows, kZPlane, kPanel, kPanelT, kPlane, kFused, kLanes, kLanesFused, kStaged
};

// At least `size` bytes that this thread reuses for `kUse` from call to call, grown as needed and
// kept until the thread ends (like onnxruntime's arena): a layer's scratch past a few KiB (GemmT's C
// for 384 channels, 75 KiB; a batch's quad image) was allocated and freed on every call, and where
// malloc gave the memory back to the system, each call faulted its pages in again (a 1x1 64->384
// at 7x7 took 35 us instead of 17 under onnxruntime's profiler). Never used by two tasks at once:
// a thread runs one task at a time, and each use is held by one function.
template <Use kUse>
uint8_t* ThreadBuffer(int64_t size) {
  thread_local std::unique_ptr<uint8_t[]> buffer;
  thread_local int64_t capacity = 0;
  if (size > capacity) {
    buffer.reset();  // (the old one first: at most one of them at a time)
    buffer.reset(new uint8_t[static_cast<size_t>(size)]);
    capacity = size;
  }
  return buffer.get();
}

// Scratch bytes of a task: on the stack while they fit N, else the thread's buffer for kUse.
template <size_t N, Use kUse>
struct Scratch {
  alignas(64) uint8_t local[N];
  uint8_t* Get(int64_t size) { return size <= static_cast<int64_t>(N) ? local : ThreadBuffer<kUse>(size); }
};

// Where a task's kernel writes the floats of Y's elements [at, at + n): into Y itself, or, with an
// Output (a residual, or uint8 Y), into this task's scratch, which Flush then takes through the
// output step (int_conv_kernels.h, Output) into Y. The kernels then run without the clip (SimdArgs).
struct Staged {
  const SimdJob& job;
  float* buffer = nullptr;
  explicit Staged(const SimdJob& j) : job(j) {}
  float* At(int64_t at, int64_t n) {
    if (job.output == nullptr) return job.y + at;
    buffer = reinterpret_cast<float*>(ThreadBuffer<Use::kStaged>(n * static_cast<int64_t>(sizeof(float))));
    return buffer;
  }
  void Flush(int64_t at, int64_t n) const {
    if (job.output != nullptr && n > 0) job.kernels->output(*job.output, buffer, n, at);
  }
};

// A panel's kept columns, matrix columns [p0, p0 + count) of image n and group gi, as runs of
// consecutive elements of Y: column p is output pixel (p / cols, p % cols) when p % cols < OW, the
// other columns are dropped. The same for every output channel of the group (Y's elements given for
// its first). runs holds kPanel (a run has a column at least). Returns how many.
int64_t PanelRuns(const SimdJob& job, int64_t n, int64_t gi, int64_t p0, int64_t count, PanelRun* runs) {
  const Geometry& g = *job.g;
  const int64_t plane = (n * g.m + gi * g.mg) * g.pixels();
  if (job.cols == g.ow) {  // no dropped columns: one run
    runs[0] = {0, count, plane + p0};
    return 1;
  }
  int64_t used = 0;
  for (int64_t p = p0; p < p0 + count;) {
    const int64_t oy = p / job.cols, ox = p % job.cols;
    if (ox >= g.ow) {
      p = (oy + 1) * job.cols;
      continue;
    }
    const int64_t run = std::min(g.ow - ox, p0 + count - p);
    runs[used++] = {p - p0, run, plane + oy * g.ow + ox};
    p += run;
  }
  return used;
}

// FinishPanel with per-pixel steps (int_conv.h, x_steps = "pixel": IntConv, 1x1, strides 1, no pads,
// group 1, so column p of image n is pixel n * H*W + p0 + p and one run): each channel's run through
// finish_pixels, into Y or, with an Output, into this task's scratch and then the output step.
void FinishPixelPanel(const SimdJob& job, int64_t n, const int32_t* tile, int64_t p0, const PanelRun* runs,
                      int64_t run_count) {
  const Geometry& g = *job.g;
  const int32_t* row_sum = job.pw->row_sum.data();
  Staged staged(job);
  for (int64_t j = 0; j < run_count; ++j) {
    const PanelRun& run = runs[j];
    const int64_t pixel = n * g.pixels() + p0 + run.column;
    for (int64_t m = 0; m < g.m; ++m) {
      const int64_t at = run.at + m * g.pixels();
      job.kernels->finish_pixels(tile + m * kPanel + run.column, run.count, row_sum[m], job.z_pixels + pixel,
                                 job.s_pixels + pixel, job.c_e[m], job.bias != nullptr ? job.bias + m : nullptr,
                                 job.clip_lo, job.clip_hi, staged.At(at, run.count));
      staged.Flush(at, run.count);
    }
  }
}

// The epilogue of a panel: rows of C (row-major, kPanel columns) into the output channels of group gi:
// with an Output (a residual, uint8 Y or the hard swish) through the output step in the same pass
// (PanelOutput), else Finish into Y.
void FinishPanel(const SimdJob& job, int64_t n, int64_t gi, const int32_t* tile, int64_t p0, int64_t count) {
  const Geometry& g = *job.g;
  const int32_t z = job.z;
  const int32_t* row_sum = job.pw->row_sum.data() + gi * job.pw->rows_pad;
  PanelRun runs[kPanel];
  const int64_t run_count = PanelRuns(job, n, gi, p0, count, runs);
  if (job.s_pixels != nullptr) return FinishPixelPanel(job, n, tile, p0, runs, run_count);
  if (job.output != nullptr) {
    PanelOutput p{};
    p.output = job.output;
    p.c = tile;
    p.channels = g.mg;
    p.post = job.post;
    p.row_sum = row_sum;
    p.z = z;
    p.c_e = job.c_e + gi * g.mg;
    p.c_o = job.c_o + gi * g.mg;
    p.bias = job.bias != nullptr ? job.bias + gi * g.mg : nullptr;
    p.runs = runs;
    p.run_count = run_count;
    p.stride = g.pixels();
    p.started = !job.gemm_start.empty();
    job.kernels->panel_output(p);
    return;
  }
  for (int64_t mm = 0; mm < g.mg; ++mm) {
    const int64_t m = gi * g.mg + mm, row = job.post ? 2 * mm : mm;
    const int32_t* e = tile + row * kPanel;
    const float* bias = job.bias != nullptr ? job.bias + m : nullptr;
    for (int64_t j = 0; j < run_count; ++j) {
      const PanelRun& run = runs[j];
      job.kernels->finish_run(e + run.column, job.post ? e + kPanel + run.column : nullptr, run.count, z * row_sum[row],
                              job.post ? z * row_sum[row + 1] : 0, job.c_e[m], job.c_o[m], bias, job.clip_lo,
                              job.clip_hi, job.y + run.at + mm * g.pixels());
    }
  }
}

// GemmT: output pixels [q0, q0 + count) of one image and group.
void RunPanelT(const SimdJob& job, int64_t n, int64_t gi, int64_t q0, int64_t count) {
  const Geometry& g = *job.g;
  const PackedWeights& pw = *job.pw;
  GemmT gemm{};
  gemm.a = pw.a16.data() + gi * pw.rows16 * pw.k4 * 4;
  gemm.rows = pw.rows16;
  gemm.k4 = pw.k4;
  gemm.pixels = count;
  gemm.chunk = job.chunk;
  gemm.runs = pw.runs16.empty() ? nullptr : pw.runs16.data() + gi * pw.rows16 / kLanes * pw.k4;
  gemm.wide = pw.wide;
  // The pixels' offsets and C: on the stack for small panels.
  const int64_t pixels_bytes = RoundUp(count * 8, 64), c_bytes = RoundUp(count * pw.rows16 * 4, 64);
  Scratch<40960, Use::kPanelT> scratch;
  uint8_t* bytes = scratch.Get(pixels_bytes + c_bytes);
  auto* pixels = reinterpret_cast<int64_t*>(bytes);
  auto* by_pixel = reinterpret_cast<int32_t*>(bytes + pixels_bytes);
  gemm.b = job.x4 + (n * g.group + gi) * pw.c4 * job.ph.size() * 4;
  gemm.b_offsets = job.offsets.data();
  int64_t oy = q0 / g.ow, ox = q0 % g.ow;
  for (int64_t i = 0; i < count; ++i) {
    pixels[i] = (oy * job.ph.wq + ox) * 4;
    if (++ox == g.ow) {
      ox = 0;
      ++oy;
    }
  }
  gemm.pixel_offsets = pixels;
  gemm.c = by_pixel;
  // The epilogue: the kernel finishes C from its registers where it can (int_conv_finish.h, GemmTFinishKernel).
  FinishT f{};
  f.c = by_pixel;
  f.pixels = count;
  f.channels = g.mg;
  f.post = job.post;
  f.z = job.t_z_at + gi * job.t_rows;
  f.factor = job.t_factor_at + gi * job.t_rows;
  f.bias = job.bias != nullptr ? job.bias + gi * g.mg : nullptr;
  f.clip_lo = job.clip_lo;
  f.clip_hi = job.clip_hi;
  const int64_t at = (n * g.m + gi * g.mg) * g.pixels() + q0;
  f.out = job.output != nullptr ? nullptr : job.y + at;  // (an Output takes the floats through the output step)
  f.stride = g.pixels();
  f.output = job.output;
  f.at = at;
  if (job.s_pixels != nullptr) {  // (per-pixel steps: 1x1, strides 1, no pads, so output pixel q is input pixel q)
    f.z_pixels = job.z_pixels + n * g.pixels() + q0;
    f.s_pixels = job.s_pixels + n * g.pixels() + q0;
  }
  job.kernels->gemm_t(gemm, f);
}

// kQuad: one panel of matrix columns of one image and group: the product, the epilogue.
void RunPanel(const SimdJob& job, int64_t index) {
  const Geometry& g = *job.g;
  const PackedWeights& pw = *job.pw;
  const int64_t n = index / (g.group * job.panels), gi = index / job.panels % g.group;
  const int64_t p0 = index % job.panels * job.panel, count = std::min(job.panel, job.span - p0);
  const int64_t count16 = RoundUp(count, 16);

  if (job.transposed) return RunPanelT(job, n, gi, p0, count);
  Gemm gemm{};
  gemm.a = pw.a.data() + gi * pw.rows_pad * pw.k4 * 4;
  gemm.a_hi = pw.a_hi.empty() ? nullptr : pw.a_hi.data() + gi * pw.rows_pad * pw.k4 * 4;
  gemm.rows = pw.rows_pad;
  gemm.k4 = pw.k4;
  gemm.pixels = count16;
  gemm.chunk = job.chunk;
  gemm.runs = pw.runs.empty() ? nullptr : pw.runs.data() + gi * pw.rows_pad / kRows * pw.k4;
  gemm.wide = pw.wide;
  gemm.b = job.x4 + ((n * g.group + gi) * pw.c4 * job.ph.size() + p0) * 4;
  gemm.b_offsets = job.offsets.data();
  Scratch<32768, Use::kPanel> scratch;  // C (on the stack up to 128 rows)
  auto* tile = reinterpret_cast<int32_t*>(scratch.Get(pw.rows_pad * kPanel * 4));
  gemm.c = tile;
  gemm.start = job.gemm_start.empty() ? nullptr : job.gemm_start.data() + gi * pw.rows_pad;
  job.kernels->gemm(gemm);

  FinishPanel(job, n, gi, tile, p0, count);
}

// kDepthwise: input channels [g0, g0 + job.channels) of image n (index n * chunks + chunk), each
// into its output channels.
void RunDepthwise(const SimdJob& job, int64_t index) {
  const Geometry& g = *job.g;
  const PackedWeights& pw = *job.pw;
  const int64_t chunks = (g.group + job.channels - 1) / job.channels;
  const int64_t n = index / chunks, g0 = index % chunks * job.channels;
  const Phases& ph = job.ph;
  uint8_t* const plane = ThreadBuffer<Use::kPlane>(ph.size() + kSlack);
  // With stride 1 the rows of X overwrite the same bytes in every channel: the padding around
  // them is written once.
  const bool one_phase = ph.sh == 1 && ph.sw == 1;
  if (one_phase) std::memset(plane, job.z, static_cast<size_t>(ph.size() + kSlack));
  Staged staged(job);
  for (int64_t gi = g0; gi < std::min(g0 + job.channels, g.group); ++gi) {
    // The padded input channel in phase planes.
    if (!one_phase) std::memset(plane, job.z, static_cast<size_t>(ph.size() + kSlack));
    const uint8_t* src = job.xq + (n * g.c + gi) * g.h * g.w;
    auto rows = ph.RowsFrom(g.pt);
    for (int64_t iy = 0; iy < g.h; ++iy, ++rows) ScatterRow(ph, src + iy * g.w, g.w, g.pl, plane + *rows);
    for (int64_t mm = 0; mm < g.mg; ++mm) {
      const int64_t m = gi * g.mg + mm;
      Depthwise d{};
      d.plane = plane;
      d.cols = job.cols;
      d.span = job.span;
      d.ow = g.ow;
      d.post = job.post;
      for (int64_t list = 0; list < (job.post ? 2 : 1); ++list) {
        const int64_t first = pw.list_start[2 * m + list];
        d.offsets[list] = job.tap_offsets.data() + first;
        d.weights[list] = pw.weights.data() + first;
        d.taps[list] = pw.list_start[2 * m + list + 1] - first;
        d.narrow[list] = pw.list_narrow[2 * m + list] != 0;
      }
      d.z_e = job.z * pw.list_sum[2 * m];
      d.z_o = job.post ? job.z * pw.list_sum[2 * m + 1] : 0;
      d.c_e = job.c_e[m];
      d.c_o = job.c_o[m];
      d.bias = job.bias != nullptr ? job.bias + m : nullptr;
      d.clip_lo = job.clip_lo;
      d.clip_hi = job.clip_hi;
      d.out = staged.At((n * g.m + m) * g.pixels(), g.pixels());
      job.kernels->depthwise(d);
      staged.Flush((n * g.m + m) * g.pixels(), g.pixels());
    }
  }
}

// Where the job's X lies in its padded plane.
PaddedPlane PlaneOf(const SimdJob& job) {
  const Geometry& g = *job.g;
  return PaddedPlane{g.h, g.w, g.pt, g.pl, job.hp, job.wp, g.sh, g.sw, job.z};
}

// dst[i] = x[i] quantized with the call's parameters, for i < count (QuantizeFused: exact, may
// write up to 64 bytes past count): the input of DepthwiseFused and LanesFused.
void QuantizeChannels(const SimdJob& job, const float* x, int64_t count, uint8_t* dst) {
  DepthwiseFused q{};
  q.x = x;
  q.scale = job.x_scale;
  q.inverse = job.inverse;
  q.lo = job.x_lo;
  q.hi = job.x_hi;
  q.z = job.z;
  job.kernels->quantize_fused(q, count, dst);
}

// DepthwiseFused: input channels [g0, g0 + job.channels) of image n (index n * chunks + chunk),
// each quantized and padded, then into its output channels.
void RunDepthwiseFused(const SimdJob& job, int64_t index) {
  const Geometry& g = *job.g;
  const int64_t chunks = (g.group + job.channels - 1) / job.channels;
  const int64_t n = index / chunks, g0 = index % chunks * job.channels;
  const int64_t g1 = std::min(g0 + job.channels, g.group);
  // Scratch: the task's channels quantized (unless the kernel quantizes X into its plane itself, or
  // X is uint8: its bytes go into the plane as they are), then the plane (small images: on the stack).
  const bool bytes_given = job.x == nullptr;
  const bool quantize_rows = job.kernels->fused_quantize_rows;
  const int64_t bytes_size = quantize_rows || bytes_given ? 0 : RoundUp((g1 - g0) * g.h * g.w + kFusedSlack, 64);
  const int64_t hq = (job.hp + g.sh - 1) / g.sh;
  const int64_t scratch_size = bytes_size + g.sh * hq * job.wp + kFusedSlack;
  Scratch<16384, Use::kFused> buffer;
  uint8_t* scratch = buffer.Get(scratch_size);
  DepthwiseFused d{};
  static_cast<PaddedPlane&>(d) = PlaneOf(job);
  d.hq = hq;
  d.plane = scratch + bytes_size;
  d.fresh = true;
  d.span = job.span;
  d.pixels = g.pixels();
  d.keep = job.keep.data();
  d.starts = job.starts.data();
  d.groups = static_cast<int64_t>(job.offsets.size());  // (none for FusedPair lists)
  d.offsets = job.offsets.data();
  d.pairs = job.fused_pairs.data();
  d.outputs = g.mg;
  d.post = job.post;
  // The channels are contiguous in X: one quantization run for all of them, then each copied into
  // the plane (else quantized row by row into it: int_conv_fused.h, QuantizePlane).
  if (!quantize_rows && !bytes_given) {
    QuantizeChannels(job, job.x + (n * g.c + g0) * g.h * g.w, (g1 - g0) * g.h * g.w, scratch);
  }
  d.scale = job.x_scale;
  d.inverse = job.inverse;
  d.lo = job.x_lo;
  d.hi = job.x_hi;
  for (int64_t gi = g0; gi < g1; ++gi) {
    const int64_t m = gi * g.mg;
    d.x = bytes_given ? nullptr : job.x + (n * g.c + gi) * g.h * g.w;  // (null: the kernel copies d.bytes)
    d.readable = (g.n * g.c - (n * g.c + gi)) * g.h * g.w;
    d.bytes = bytes_given ? job.xq + (n * g.c + gi) * g.h * g.w : scratch + (gi - g0) * g.h * g.w;
    if (job.kernels->fused_tap_groups) d.weights = job.fused_weights->data() + m * 2 * d.groups;
    d.pair_start = job.pw->pair_start.data() + 2 * m;
    d.z_e = job.fused_z.data() + m;
    d.z_o = job.fused_z.data() + g.m + m;
    d.c_e = job.c_e + m;
    d.c_o = job.c_o + m;
    d.bias = job.bias != nullptr ? job.bias + m : nullptr;
    d.clip_lo = job.clip_lo;
    d.clip_hi = job.clip_hi;
    d.at = (n * g.m + m) * g.pixels();
    d.out = job.output != nullptr ? nullptr : job.y + d.at;
    d.output = job.output;
    job.kernels->depthwise_fused(d);
    d.fresh = false;
  }
}

#ifdef ONNXQ_X86_SIMD
// 16 rows of 16 bytes transposed (r[i][j] -> r[j][i]): four rounds of interleaving row i with row
// i + 8 are a perfect shuffle that transposes a 16 x 16 matrix.
void Transpose16(__m128i r[16]) {
  __m128i t[16];
  for (int round = 0; round < 4; ++round) {
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm_unpacklo_epi8(r[i], r[i + 8]);
      t[2 * i + 1] = _mm_unpackhi_epi8(r[i], r[i + 8]);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
  }
}
#endif

// The output side of a lane kernel for channels [16 b, 16 b + 16) of image n: its per-lane
// factors (laid out once per call in SimdJob's lane tables), clip bounds and output planes `out`
// (of Y, or staged: then the caller flushes lanes * pixels floats from Y's element LaneOutputAt).
int64_t LaneOutputAt(const SimdJob& job, int64_t n, int64_t b) { return (n * job.g->m + b * 16) * job.g->pixels(); }

void SetLaneOutput(LaneOutput& o, const SimdJob& job, int64_t b, float* out) {
  const Geometry& g = *job.g;
  const int64_t m16 = job.blocks * 16;
  o.post = job.post;
  o.z_e = job.lane_z_at + b * 16;
  o.z_o = job.lane_z_at + m16 + b * 16;
  o.c_e = job.lane_factors_at + b * 16;
  o.c_o = job.lane_factors_at + m16 + b * 16;
  o.bias = job.bias != nullptr ? job.lane_factors_at + 2 * m16 + b * 16 : nullptr;
  o.clip_lo = job.clip_lo;
  o.clip_hi = job.clip_hi;
  o.oh = g.oh;
  o.ow = g.ow;
  o.out = out;
}

// DepthwiseLanes: channels [16 b, 16 b + 16) of image n (index n * blocks + b): the padded
// image with the channels in the lanes of each pixel (z for padding and channels past C), then
// the kernel.
void RunDepthwiseLanes(const SimdJob& job, int64_t index) {
#ifdef ONNXQ_X86_SIMD
  const Geometry& g = *job.g;
  const PackedWeights& pw = *job.pw;
  const int64_t n = index / job.blocks, b = index % job.blocks;
  const int64_t size = job.hp * job.wp * 16;
  uint8_t* const x = ThreadBuffer<Use::kLanes>(size);
  std::memset(x, job.z, static_cast<size_t>(size));
  const uint8_t* planes[16];
  for (int64_t i = 0; i < 16; ++i) {
    const int64_t c = b * 16 + i;
    planes[i] = c < g.c ? job.xq + (n * g.c + c) * g.h * g.w : nullptr;
  }
  // Pixels of X in runs of 16 (the rows of a channel are contiguous), each to its padded place.
  alignas(16) uint8_t bounce[16];
  int64_t iy = 0, ix = 0;
  for (int64_t q0 = 0; q0 < g.h * g.w; q0 += 16) {
    const int64_t count = std::min<int64_t>(16, g.h * g.w - q0);
    __m128i r[16];
    for (int i = 0; i < 16; ++i) {
      if (planes[i] != nullptr && count == 16) {
        r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(planes[i] + q0));
        continue;
      }
      std::memset(bounce, job.z, sizeof(bounce));
      if (planes[i] != nullptr) std::memcpy(bounce, planes[i] + q0, static_cast<size_t>(count));
      r[i] = _mm_load_si128(reinterpret_cast<const __m128i*>(bounce));
    }
    Transpose16(r);
    for (int64_t j = 0; j < count; ++j) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(x + ((g.pt + iy) * job.wp + g.pl + ix) * 16), r[j]);
      if (++ix == g.w) {
        ix = 0;
        ++iy;
      }
    }
  }
  const int64_t taps = g.kh * g.kw;
  DepthwiseLanes d{};
  d.x = x;
  d.wp = job.wp;
  d.sh = g.sh;
  d.sw = g.sw;
  d.offsets = job.lane_offsets.data();
  d.taps = taps;
  d.w_e = pw.lane_weights.data() + (b * 2) * taps * 16;
  d.w_o = pw.lane_weights.data() + (b * 2 + 1) * taps * 16;
  Staged staged(job);
  SetLaneOutput(d, job, b, staged.At(LaneOutputAt(job, n, b), std::min<int64_t>(16, g.m - b * 16) * g.pixels()));
  d.lanes = std::min<int64_t>(16, g.m - b * 16);
  job.kernels->depthwise_lanes(d);
  staged.Flush(LaneOutputAt(job, n, b), d.lanes * g.pixels());
#else
  (void)job, (void)index;  // (off x86 only the scalar kernel exists, and this is never called)
#endif
}

// LanesFused: channels [16 b, 16 b + 16) of image n (index n * blocks + b), quantized in
// one run, then the kernel.
void RunLanesFused(const SimdJob& job, int64_t index) {
  const Geometry& g = *job.g;
  const PackedWeights& pw = *job.pw;
  const int64_t n = index / job.blocks, b = index % job.blocks;
  const int64_t lanes = std::min<int64_t>(16, g.c - b * 16);
  const int64_t bytes_size = RoundUp(16 * g.h * g.w + 128, 64);
  const int64_t step = LanesStep(job.kernels->lane_taps, g.sw, g.kw);
  const int64_t scratch_size = bytes_size + LanesScratch(job.hp, job.wp, step);
  Scratch<24576, Use::kLanesFused> buffer;
  uint8_t* scratch = buffer.Get(scratch_size);
  const int64_t first = (n * g.c + b * 16) * g.h * g.w, count = lanes * g.h * g.w;
  LanesFused d{};
  d.bytes = scratch;
  if (job.x != nullptr) {
    QuantizeChannels(job, job.x + first, count, scratch);
  } else if (first + count + 64 <= g.n * g.c * g.h * g.w) {  // uint8 X, readable 64 bytes past the block
    d.bytes = job.xq + first;
  } else {
    std::memcpy(scratch, job.xq + first, static_cast<size_t>(count));
  }
  d.lanes = lanes;
  static_cast<PaddedPlane&>(d) = PlaneOf(job);
  d.step = step;
  d.scratch = scratch + bytes_size;
  d.groups = static_cast<int64_t>(job.lane_offsets.size());
  d.offsets = job.lane_offsets.data();
  if (job.kernels->lane_taps == 4) {
    d.weights = pw.lane_quads.data() + b * 2 * d.groups * 16;
  } else {
    d.weights = pw.lane_pairs.data() + b * 2 * d.groups * 16;
  }
  // (an Output: the kernel takes its outputs through the output step from a tile of its own)
  d.at = LaneOutputAt(job, n, b);
  d.output = job.output;
  SetLaneOutput(d, job, b, job.output != nullptr ? nullptr : job.y + d.at);
  job.kernels->lanes_fused(d);
}

void RunTask(void* data, size_t index) {
  auto& job = *static_cast<SimdJob*>(data);
  try {
    if (job.fused) {
      RunDepthwiseFused(job, static_cast<int64_t>(index));
    } else if (job.lanes_fused) {
      RunLanesFused(job, static_cast<int64_t>(index));
    } else if (job.lanes) {
      RunDepthwiseLanes(job, static_cast<int64_t>(index));
    } else if (job.pw->mode == Mode::kDepthwise) {
      RunDepthwise(job, static_cast<int64_t>(index));
    } else {
      RunPanel(job, static_cast<int64_t>(index));
    }
  } catch (...) {  // (std::bad_alloc) must not cross onnxruntime's thread pool
    job.failed = true;
  }
}

// Four channel rows of `count` pixels interleaved: dst[4*p + j] = src[j][p].
void Interleave4(const uint8_t* const src[4], int64_t count, uint8_t* dst) {
  int64_t p = 0;
#ifdef __SSE2__
  for (; p + 16 <= count; p += 16) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[0] + p));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[1] + p));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[2] + p));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src[3] + p));
    const __m128i ab_lo = _mm_unpacklo_epi8(a, b), ab_hi = _mm_unpackhi_epi8(a, b);
    const __m128i cd_lo = _mm_unpacklo_epi8(c, d), cd_hi = _mm_unpackhi_epi8(c, d);
    auto* out = reinterpret_cast<__m128i*>(dst + 4 * p);
    _mm_storeu_si128(out, _mm_unpacklo_epi16(ab_lo, cd_lo));
    _mm_storeu_si128(out + 1, _mm_unpackhi_epi16(ab_lo, cd_lo));
    _mm_storeu_si128(out + 2, _mm_unpacklo_epi16(ab_hi, cd_hi));
    _mm_storeu_si128(out + 3, _mm_unpackhi_epi16(ab_hi, cd_hi));
  }
#endif
#ifdef __SSE2__
  if (p < count && count >= 16) {  // the last 16 pixels again, some of them a second time (the same bytes)
    const uint8_t* const last[4] = {src[0] + count - 16, src[1] + count - 16, src[2] + count - 16, src[3] + count - 16};
    Interleave4(last, 16, dst + 4 * (count - 16));
    return;
  }
  if (count - p >= 4) {  // the tail (runs under 16 pixels) through 16-byte buffers
    const int64_t tail = count - p;
    alignas(16) uint8_t in[4][16], out[64];
    for (int j = 0; j < 4; ++j) std::memcpy(in[j], src[j] + p, static_cast<size_t>(tail));
    const uint8_t* const bounce[4] = {in[0], in[1], in[2], in[3]};
    Interleave4(bounce, 16, out);
    std::memcpy(dst + 4 * p, out, static_cast<size_t>(4 * tail));
    return;
  }
#endif
  for (; p < count; ++p) {
    for (int j = 0; j < 4; ++j) dst[4 * p + j] = src[j][p];
  }
}

// kQuad's B: x4[n][g][c4][phase pixel][j] = channel 4*c4 + j of group g at padded (y, x), in the
// phase planes of job.ph; z outside X and for channels past the group's end. Each plane is set to z
// just before it is filled (while it is in cache), unless X covers it (1x1 convolutions).
void BuildQuadImage(const SimdJob& job, uint32_t* x4) {
  const Geometry& g = *job.g;
  const Phases& ph = job.ph;
  const int64_t c4 = job.pw->c4;
  // No column padding, stride 1: the rows of a plane are one run (1x1 convolutions).
  const bool one_run = ph.sh == 1 && ph.sw == 1 && ph.wq == g.w;
  const bool covered = one_run && ph.hq == g.h;  // (no row padding either)
  uint8_t* const z_plane = g.cg % 4 != 0 ? ThreadBuffer<Use::kZPlane>(g.h * g.w) : nullptr;
  if (z_plane != nullptr) std::memset(z_plane, job.z, static_cast<size_t>(g.h * g.w));
  // Else each quad's plane interleaved in one run too, then its rows put in place: interleaving row by
  // row went through 16-byte buffers (memcpy in and out) for every row's last w % 16 pixels, all of
  // the rows of 7 and 14 (ResNet-20 at 28x28 to 7x7: a tenth of its time, with the memcpy).
  uint32_t* const run = one_run ? nullptr : reinterpret_cast<uint32_t*>(ThreadBuffer<Use::kRows>(g.h * g.w * 4));
  for (int64_t n = 0; n < g.n; ++n) {
    for (int64_t gi = 0; gi < g.group; ++gi) {
      for (int64_t ci = 0; ci < c4; ++ci) {
        uint32_t* dst = x4 + ((n * g.group + gi) * c4 + ci) * ph.size();
        if (!covered) std::memset(dst, job.z, static_cast<size_t>(ph.size() * 4));
        const uint8_t* src[4];
        for (int64_t j = 0; j < 4; ++j) {
          const int64_t c = ci * 4 + j;
          src[j] = c < g.cg ? job.xq + (n * g.c + gi * g.cg + c) * g.h * g.w : z_plane;
        }
        if (one_run) {
          Interleave4(src, g.h * g.w, reinterpret_cast<uint8_t*>(dst + g.pt * g.w));
          continue;
        }
        Interleave4(src, g.h * g.w, reinterpret_cast<uint8_t*>(run));
        auto rows = ph.RowsFrom(g.pt);
        for (int64_t iy = 0; iy < g.h; ++iy, ++rows) {
          if (ph.sw == 1) {
            std::memcpy(dst + *rows + g.pl, run + iy * g.w, static_cast<size_t>(g.w * 4));
          } else {
            ScatterRow(ph, run + iy * g.w, g.w, g.pl, dst + *rows);
          }
        }
      }
    }
  }
}

// DepthwiseFused's tables: which columns are outputs and where their outputs start, the tap
// groups, and z_x * each list's sum of weights.
void PrepareFused(SimdJob& job) {
  const Geometry& g = *job.g;
  const PackedWeights& pw = *job.pw;
  job.hp = g.h + g.pt + job.pad_bottom;
  // Rows of whole groups of fused_row_columns matrix columns: AVX2's 8, so that a group's outputs
  // are its first columns and Avx2::Fused (kernels_avx2.cc) stores them without a permute (VNNI
  // compresses them in one instruction).
  job.wp = RoundUp(g.w + g.pl + job.pad_right, job.kernels->fused_row_columns * g.sw);
  job.cols = job.wp / g.sw;
  job.span = (g.oh - 1) * job.cols + g.ow;
  const int64_t columns = RoundUp(job.span, 64);  // whole blocks of either kernel
  job.keep.assign(static_cast<size_t>(columns / 8), 0);
  job.starts.assign(static_cast<size_t>(columns / 8 + 1), 0);
  int64_t ox = 0, kept = 0;
  for (int64_t p = 0; p < columns; ++p) {
    if (p % 8 == 0) job.starts[p / 8] = kept;
    if (p < job.span && ox < g.ow) {
      job.keep[p / 8] |= static_cast<uint8_t>(1u << (p % 8));
      ++kept;
    }
    if (++ox == job.cols) ox = 0;
  }
  job.starts[columns / 8] = kept;
  const int64_t hq = (job.hp + g.sh - 1) / g.sh;
  auto offset = [&](int64_t ky, int64_t kx) {  // of tap (ky, kx) in the plane
    const int64_t y = ky * g.dh;
    return ((y % g.sh) * hq + y / g.sh) * job.wp + kx;
  };
  job.offsets.clear();
  if (job.kernels->fused_tap_groups) {  // groups of 4 taps
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      for (int64_t kx = 0; kx < g.kw; kx += 4) job.offsets.push_back(offset(ky, kx));
    }
    job.fused_weights = &pw.quads;
  } else {  // the nonzero pairs (FusedPair)
    std::vector<int64_t> tap_offset(static_cast<size_t>(g.kh * g.kw));
    for (int64_t t = 0; t < g.kh * g.kw; ++t) tap_offset[t] = offset(t / g.kw, t % g.kw);
    job.fused_pairs.resize(pw.pair_tap.size());
    for (size_t i = 0; i < pw.pair_tap.size(); ++i) job.fused_pairs[i] = {tap_offset[pw.pair_tap[i]], pw.pair_weights[i], 0};
  }
  job.fused_z.resize(static_cast<size_t>(2 * g.m));
  for (int64_t m = 0; m < g.m; ++m) {
    job.fused_z[m] = job.z * pw.list_sum[2 * m];
    job.fused_z[g.m + m] = job.z * pw.list_sum[2 * m + 1];
  }
  job.inverse = FusedInverse(job.x_scale);
}

}  // namespace

namespace {
// One kernel family's tables for a call (CallTables::Kept, `family` of `tables`): those an earlier call of the node
// kept, or, where there are none yet (or the node keeps none: `tables` null), the ones `lay_out` writes into z and
// factors now, which are then kept. z_at and factors_at point at the tables the kernels are to read.
template <class LayOut>
void UseTables(CallTables* tables, CallTables::Kept CallTables::*family, const std::vector<int32_t>& z,
               const std::vector<float>& factors, LayOut lay_out, const int32_t*& z_at, const float*& factors_at) {
  CallTables::Kept* kept = tables != nullptr ? &(tables->*family) : nullptr;
  if (kept != nullptr && kept->ready.load(std::memory_order_acquire)) {
    z_at = kept->z.data();
    factors_at = kept->factors.data();
    return;
  }
  lay_out();
  z_at = z.data();
  factors_at = factors.data();
  if (kept != nullptr) kept->Keep(tables->mutex, z, factors);
}

// LanesFused rather than DepthwiseFused (tools/bench_ops.py on Zen 4): with VNNI faster from 7x7
// to 112x112 images, most at 7x7 where DepthwiseFused's per-channel plane and block setup dominate,
// while its scratch (a block's quantized planes, padded image and cells) stays in about a quarter
// of a 1 MiB L2 cache; with AVX2 (int16 sums, twice the instructions per tap) faster for inputs up
// to 14x14 (dw 576 3x3 @7: 0.56 -> 0.76x float), even at 28x28 -> 14x14 and mixed above.
bool UseLanesFused(const Geometry& g, const PackedWeights& pw, Isa isa, int64_t pad_bottom, int64_t pad_right) {
  const Kernels& k = KernelsFor(isa);
  if (k.lanes_fused == nullptr || (k.lane_taps == 4 ? pw.lane_quads.empty() : pw.lane_pairs.empty())) return false;
  if (isa == Isa::kAvx2) return g.h * g.w <= 16 * 16;
  const int64_t hp = g.h + g.pt + pad_bottom, wp = g.w + g.pl + pad_right;
  return 16 * g.h * g.w + LanesScratch(hp, wp, LanesStep(k.lane_taps, g.sw, g.kw)) <= 256 * 1024;
}
}  // namespace

bool UsesFusedDepthwise(const Geometry& g, const PackedWeights& pw, Isa isa) {
  if (pw.mode != Mode::kDepthwise || g.k == 0 || g.sw > 2 || g.dw != 1) return false;
  const Kernels& k = KernelsFor(isa);  // (FusedPair lists exist where every list is narrow)
  return k.depthwise_fused != nullptr && (k.fused_tap_groups || !pw.pair_start.empty());
}

namespace {
// Every sw-th byte of src (count of them) to dst, which may be written up to 16 bytes past count; src may
// be read up to `end`.
void StridedBytes(const uint8_t* src, int64_t count, int64_t sw, const uint8_t* end, uint8_t* dst) {
  int64_t i = 0;
#ifdef __SSE2__
  if (sw == 2) {  // the even bytes of 32 at a time (rows of 28: one step, into the slack)
    const __m128i low = _mm_set1_epi16(0x00FF);
    for (; i < count && src + 2 * i + 32 <= end; i += 16) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i + 16));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_packus_epi16(_mm_and_si128(a, low), _mm_and_si128(b, low)));
    }
  }
#endif
  for (; i < count; ++i) dst[i] = src[i * sw];
}
}  // namespace

namespace {
// The body of SimdConv: X as the call's geometry says (after SimdConv's rewrites of it).
void RunConv(const SimdArgs& args, Ort::KernelContext& context);

// A tap-quad convolution's input (int_conv_impl.h, UsesTapQuads): channel j of image n is X's padded
// plane moved up by j*dh rows, TapQuadRows rows of W bytes, z where it falls outside X. Each channel is
// one run of X's rows between two runs of z (the plane's rows are contiguous).
void BuildTapRows(const SimdArgs& args, int64_t rows, uint8_t* dst) {
  const Geometry& g = *args.g;
  for (int64_t n = 0; n < g.n; ++n) {
    const uint8_t* plane = args.xq + n * g.h * g.w;
    for (int64_t j = 0; j < 4; ++j, dst += rows * g.w) {
      const int64_t first = j * g.dh - g.pt;  // X's row in the channel's row 0
      const int64_t begin = std::clamp<int64_t>(-first, 0, rows), end = std::clamp<int64_t>(g.h - first, begin, rows);
      std::memset(dst, args.z, static_cast<size_t>(begin * g.w));
      if (end > begin) {
        std::memcpy(dst + begin * g.w, plane + (first + begin) * g.w, static_cast<size_t>((end - begin) * g.w));
      }
      std::memset(dst + end * g.w, args.z, static_cast<size_t>((rows - end) * g.w));
    }
  }
}
}  // namespace

void SimdConv(const SimdArgs& args, Ort::KernelContext& context) {
  const Geometry& in = *args.g;
  if (args.pw->tap_quads) {
    // One input channel, a kernel of two or more rows: the 4-channel convolution of TapQuadGeometry.
    const Geometry t = TapQuadGeometry(in);
    uint8_t* const rows = ThreadBuffer<Use::kTapRows>(in.n * 4 * t.h * in.w);
    BuildTapRows(args, t.h, rows);
    SimdArgs moved = args;
    moved.g = &t;
    moved.xq = rows;
    moved.pad_bottom = 0;
    return RunConv(moved, context);
  }
  if (args.pw->mode == Mode::kQuad && in.kh == 1 && in.kw == 1 && (in.sh > 1 || in.sw > 1) && in.pt == 0 &&
      in.pl == 0 && args.pad_bottom == 0 && args.pad_right == 0 && args.xq != nullptr) {
    // A 1x1 convolution with strides and no padding (ResNet's shortcuts) reads pixel (oy*sh, ox*sw) alone:
    // those pixels, picked once, are a stride-1 input of OH x OW, which spares the quad image 3/4 of its
    // bytes and the stride phases at stride 2 (bench: 1x1 16->32 /2 @28 at batch 8, VNNI 0.077 -> 0.03 ms).
    Geometry sub = in;
    sub.h = in.oh;
    sub.w = in.ow;
    sub.sh = sub.sw = 1;
    uint8_t* const picked = ThreadBuffer<Use::kPicked>(in.n * in.c * in.oh * in.ow + 16);
    const uint8_t* end = args.xq + in.n * in.c * in.h * in.w;
    for (int64_t plane = 0; plane < in.n * in.c; ++plane) {
      for (int64_t oy = 0; oy < in.oh; ++oy) {
        StridedBytes(args.xq + (plane * in.h + oy * in.sh) * in.w, in.ow, in.sw, end,
                     picked + (plane * in.oh + oy) * in.ow);
      }
    }
    SimdArgs strided = args;
    strided.g = &sub;
    strided.xq = picked;
    return SimdConv(strided, context);
  }
  RunConv(args, context);
}

namespace {
void RunConv(const SimdArgs& args, Ort::KernelContext& context) {
  thread_local JobTables reused;
  std::unique_ptr<JobTables> own;  // (a nested call on this thread, should there ever be one: its own)
  JobTables* tables = &reused;
  if (reused.busy) {
    own = std::make_unique<JobTables>();
    tables = own.get();
  }
  tables->Clear();
  tables->busy = true;
  struct Release {
    JobTables* t;
    ~Release() { t->busy = false; }
  } release{tables};
  SimdJob job(*tables);
  static_cast<SimdArgs&>(job) = args;
  job.kernels = &KernelsFor(job.isa);
  const Geometry& g = *job.g;
  const PackedWeights& pw = *job.pw;
  Phases& ph = job.ph;
  ph.sh = g.sh;
  ph.sw = g.sw;
  ph.hq = (g.h + g.pt + job.pad_bottom + g.sh - 1) / g.sh;
  ph.wq = (g.w + g.pl + job.pad_right + g.sw - 1) / g.sw;
  job.cols = ph.wq;
  job.span = (g.oh - 1) * job.cols + g.ow;
  // GemmT where Gemm would compute many dropped or padding columns (small images) and the rows
  // fill its 16 lanes about as well as Gemm's blocks of 4: compare the multiply-adds of each.
  job.transposed = false;
  if (pw.mode != Mode::kDepthwise && !pw.a16.empty()) {
    const int64_t gemm_columns = job.span / kPanel * kPanel + RoundUp(job.span % kPanel, 16);
    job.transposed = pw.rows16 * g.pixels() * 20 < pw.rows_pad * gemm_columns * 19;
  }
  if (job.transposed) {
    job.cols = g.ow;
    job.span = g.pixels();
    job.t_rows = pw.rows16 + 2 * kLanes;  // (FinishT reads two blocks of rows past any it uses)
    auto lay_out = [&] {
      job.t_z.assign(static_cast<size_t>(g.group * job.t_rows), 0);
      job.t_factor.assign(static_cast<size_t>(g.group * job.t_rows), 0.0f);
      for (int64_t gi = 0; gi < g.group; ++gi) {
        for (int64_t r = 0; r < pw.rows; ++r) {
          const int64_t m = gi * g.mg + (job.post ? r / 2 : r);
          // (per-pixel steps: the row's sum, which FinishT multiplies by each pixel's z_x)
          const int32_t z = job.s_pixels != nullptr ? 1 : job.z;
          job.t_z[gi * job.t_rows + r] = z * pw.row_sum[gi * pw.rows_pad + r];
          job.t_factor[gi * job.t_rows + r] = job.post && r % 2 == 1 ? job.c_o[m] : job.c_e[m];
        }
      }
    };
    UseTables(job.tables, &CallTables::t, job.t_z, job.t_factor, lay_out, job.t_z_at, job.t_factor_at);
  }
  if (pw.mode == Mode::kQuad && !job.transposed && job.output != nullptr && job.s_pixels == nullptr &&
      !job.kernels->int16_sums) {
    job.gemm_start.resize(static_cast<size_t>(g.group * pw.rows_pad));
    for (size_t r = 0; r < job.gemm_start.size(); ++r) job.gemm_start[r] = -job.z * pw.row_sum[r];
  }
  if (pw.mode == Mode::kQuad) {
    const int64_t size = (g.n * g.group * pw.c4 * ph.size() + kSlack) * 4;
    uint8_t* const x4 = ThreadBuffer<Use::kQuadImage>(size);
    std::memset(x4 + size - kSlack * 4, job.z, static_cast<size_t>(kSlack * 4));
    BuildQuadImage(job, reinterpret_cast<uint32_t*>(x4));
    job.x4 = x4;
    // Each tap's place in the phase planes found once (Index divides), the quads' planes ph.size() apart.
    job.offsets.resize(static_cast<size_t>(pw.k4));
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t tap = ph.Index(ky * g.dh, kx * g.dw);
        for (int64_t ci = 0; ci < pw.c4; ++ci) job.offsets[(ci * g.kh + ky) * g.kw + kx] = (ci * ph.size() + tap) * 4;
      }
    }
  } else if (UsesFusedDepthwise(g, pw, job.isa) && UseLanesFused(g, pw, job.isa, job.pad_bottom, job.pad_right)) {
    job.lanes_fused = true;
    job.inverse = FusedInverse(job.x_scale);
    const int64_t taps = job.kernels->lane_taps;  // per group
    const int64_t step = LanesStep(taps, g.sw, g.kw);
    const int64_t wc = LanesCells(g.w + g.pl + job.pad_right, step), per_row = (g.kw + taps - 1) / taps;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      for (int64_t j = 0; j < per_row; ++j) job.lane_offsets.push_back(ky * g.dh * wc + taps * j / step);
    }
  } else if (UsesFusedDepthwise(g, pw, job.isa)) {
    job.fused = true;
    PrepareFused(job);
  } else if (pw.mode == Mode::kDepthwise) {
    job.offsets.resize(static_cast<size_t>(g.kh * g.kw));
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      for (int64_t kx = 0; kx < g.kw; ++kx) job.offsets[ky * g.kw + kx] = ph.Index(ky * g.dh, kx * g.dw);
    }
    job.tap_offsets.resize(pw.taps.size());
    for (size_t i = 0; i < pw.taps.size(); ++i) job.tap_offsets[i] = job.offsets[pw.taps[i]];
    // Channels in lanes where rows are too short for blocks of 16 pixels to pay for each
    // channel's own plane (bench_ops: dw 576 3x3 @7).
    job.lanes = !pw.lane_weights.empty() && g.ow < 16;
  }
  if (job.lanes || job.lanes_fused) {
    job.blocks = (g.m + 15) / 16;
    job.hp = g.h + g.pt + job.pad_bottom;
    job.wp = g.w + g.pl + job.pad_right;
  }
  if (job.lanes) {
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      for (int64_t kx = 0; kx < g.kw; ++kx) job.lane_offsets.push_back((ky * g.dh * job.wp + kx * g.dw) * 16);
    }
  }
  if (job.lanes || job.lanes_fused) {
    const int64_t m16 = job.blocks * 16;
    auto lay_out = [&] {
      job.lane_z.assign(static_cast<size_t>(2 * m16), 0);
      job.lane_factors.assign(static_cast<size_t>(3 * m16), 0.0f);
      for (int64_t m = 0; m < g.m; ++m) {
        job.lane_z[m] = job.z * pw.list_sum[2 * m];
        job.lane_z[m16 + m] = job.z * pw.list_sum[2 * m + 1];
        job.lane_factors[m] = job.c_e[m];
        job.lane_factors[m16 + m] = job.c_o[m];
        if (job.bias != nullptr) job.lane_factors[2 * m16 + m] = job.bias[m];
      }
    };
    UseTables(job.tables, &CallTables::lane, job.lane_z, job.lane_factors, lay_out, job.lane_z_at, job.lane_factors_at);
  }
  if (pw.mode == Mode::kQuad) {
    // Chunks of whole quads (all taps of each) whose image planes (for Gemm the part a panel
    // reads) and rows of A together fill about half the L1 cache.
    const int64_t taps = g.kh * g.kw;
    const int64_t reach = RoundUp(kPanel + (g.kh - 1) * g.dh / g.sh * ph.wq + (g.kw - 1) * g.dw / g.sw + 1, 16);
    const int64_t b_bytes = (job.transposed ? ph.size() : std::min(ph.size(), reach * g.sh * g.sw)) * 4;
    const int64_t a_bytes = taps * 4 * (job.transposed ? kLanes : kRows);
    const int64_t quads = std::max<int64_t>(1, std::min(12288 / std::max<int64_t>(1, b_bytes), 8192 / a_bytes));
    job.chunk = taps * quads;
    // GemmT with one block of 16 rows reads each chunk of the planes once (its tiles walk the pixels in order;
    // no other block of rows comes back to it), so chunks keep nothing in L1 there and only cut k: all of k at
    // once, one int16 run fewer per tile where they did (ResNet-20's 3x3 16 -> 16 at 28x28: chunks of 27 blocks
    // of its 36, 2-3 runs per tile where 1-2 fit).
    if (job.transposed && pw.rows16 == kLanes) job.chunk = pw.k4;
  }
  if (job.transposed) {
    // GemmT's panels: as many multiples of kPanel pixels as keep C (4 bytes per pixel and row) within
    // about 16 KiB, or the whole image: fewer, longer runs for the output step (whose runs of whole
    // blocks of 64 need no tail), and fewer tiles cut short at a panel's end (16 rows: 256 pixels).
    const int64_t pixels = std::max<int64_t>(1, 16384 / (4 * pw.rows16 * kPanel)) * kPanel;
    job.panel = std::min(g.pixels(), pixels);
  }
  job.panels = (job.span + job.panel - 1) / job.panel;
  job.channels = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.pixels() * g.mg));  // tasks of >= 4096 outputs
  const int64_t total = job.lanes || job.lanes_fused     ? g.n * job.blocks
                        : pw.mode == Mode::kDepthwise ? g.n * ((g.group + job.channels - 1) / job.channels)
                                                      : g.n * g.group * job.panels;
  if (total == 0) return;
  context.ParallelFor(RunTask, static_cast<size_t>(total), 0, &job);
  if (job.failed) throw std::bad_alloc();
}
}  // namespace

}  // namespace onnxq::iconv
