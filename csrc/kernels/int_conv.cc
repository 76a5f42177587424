// PostConv and IntConv (int_conv.h has their definition) as onnxruntime ops: attributes, input
// checks, the activations' quantization, weights prepared once, and the choice of kernel.
#include "kernels/int_conv.h"

#include <math.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "kernels/int_conv_asq.h"
#include "kernels/int_conv_impl.h"
#include "kernels/kernels.h"
#include "kernels/quantize_dynamic_u8_kernels.h"

namespace onnxq {
namespace iconv {
namespace {

// Sizes from attributes and shapes, saturating at 2^63 - 1 instead of overflowing: huge pads,
// dilations or kernel shapes become sizes too large for the checks in Compute, never wrong ones.
constexpr int64_t kHuge = INT64_MAX;
int64_t SatAdd(int64_t a, int64_t b) {
  int64_t sum;
  return __builtin_add_overflow(a, b, &sum) ? kHuge : sum;
}
int64_t SatMul(int64_t a, int64_t b) {
  int64_t product;
  return __builtin_mul_overflow(a, b, &product) ? kHuge : product;
}
std::string SizeText(int64_t size) { return size == kHuge ? ">= 2^63-1" : std::to_string(size); }

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

// Attributes through the C API: absent (or not of this type) -> false.
bool ReadInt(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t* value) {
  if (OrtStatus* status = api.KernelInfoGetAttribute_int64(info, name, value)) {
    api.ReleaseStatus(status);
    return false;
  }
  return true;
}

bool ReadFloat(const OrtApi& api, const OrtKernelInfo* info, const char* name, float* value) {
  if (OrtStatus* status = api.KernelInfoGetAttribute_float(info, name, value)) {
    api.ReleaseStatus(status);
    return false;
  }
  return true;
}

bool ReadInts(const OrtApi& api, const OrtKernelInfo* info, const char* name, std::vector<int64_t>* values) {
  size_t size = 0;
  if (OrtStatus* status = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size)) {
    api.ReleaseStatus(status);
    return false;
  }
  values->resize(size);
  if (size == 0) return true;
  if (OrtStatus* status = api.KernelInfoGetAttributeArray_int64(info, name, values->data(), &size)) {
    api.ReleaseStatus(status);
    return false;
  }
  return true;
}

bool ReadString(const OrtApi& api, const OrtKernelInfo* info, const char* name, std::string* value) {
  size_t size = 0;
  if (OrtStatus* status = api.KernelInfoGetAttribute_string(info, name, nullptr, &size)) {
    api.ReleaseStatus(status);
    return false;
  }
  std::string text(size, '\0');
  if (OrtStatus* status = api.KernelInfoGetAttribute_string(info, name, text.data(), &size)) {
    api.ReleaseStatus(status);
    return false;
  }
  text.resize(size > 0 ? size - 1 : 0);  // (size counts the terminating NUL)
  *value = text;
  return true;
}

}  // namespace
}  // namespace iconv

using iconv::InvalidArgument;

IntConvKernel::IntConvKernel(bool post, bool quantized, const OrtApi& api, const OrtKernelInfo* info)
    : post_(post), quantized_(quantized) {
  const std::string op = name();
  auto fail = [&](const std::string& message) {
    if (error_.empty()) error_ = op + ": " + message;
  };
  if (!iconv::ReadInt(api, info, "bits", &bits_)) {
    fail("attribute bits (int) is required");
  } else if (post ? (bits_ < 2 || bits_ > 4) : (bits_ < 2 || bits_ > 8)) {
    fail(std::string("attribute bits must be ") + (post ? "2, 3 or 4 (POST codes)" : "in 2..8") + ", not " +
         std::to_string(bits_));
  }
  std::vector<int64_t> ints;
  if (!iconv::ReadInts(api, info, "kernel_shape", &ints)) {
    fail("attribute kernel_shape (2 ints) is required");
  } else if (ints.size() != 2 || ints[0] < 1 || ints[1] < 1) {
    fail("attribute kernel_shape must be 2 positive ints [kh, kw]");
  } else {
    kh_ = ints[0];
    kw_ = ints[1];
  }
  if (iconv::ReadInts(api, info, "strides", &ints)) {
    if (ints.size() != 2 || ints[0] < 1 || ints[1] < 1) {
      fail("attribute strides must be 2 positive ints");
    } else {
      sh_ = ints[0];
      sw_ = ints[1];
    }
  }
  if (iconv::ReadInts(api, info, "dilations", &ints)) {
    if (ints.size() != 2 || ints[0] < 1 || ints[1] < 1) {
      fail("attribute dilations must be 2 positive ints");
    } else {
      dh_ = ints[0];
      dw_ = ints[1];
    }
  }
  if (iconv::ReadInts(api, info, "pads", &ints)) {
    if (ints.size() != 4 || *std::min_element(ints.begin(), ints.end()) < 0) {
      fail("attribute pads must be 4 non-negative ints [top, left, bottom, right]");
    } else {
      pad_top_ = ints[0];
      pad_left_ = ints[1];
      pad_bottom_ = ints[2];
      pad_right_ = ints[3];
    }
  }
  if (iconv::ReadInt(api, info, "group", &group_) && group_ < 1) fail("attribute group must be >= 1");
  int64_t kernel = 0;
  iconv::ReadInt(api, info, "kernel", &kernel);
  if (kernel < 0 || kernel > 3) {
    fail("attribute kernel must be 0 (auto), 1 (scalar), 2 (AVX2) or 3 (AVX-512), not " + std::to_string(kernel));
  } else {
    isa_ = kernel == 0 ? BestIsa() : static_cast<Isa>(kernel);
    if (!IsaSupported(isa_)) {
      fail("attribute kernel=" + std::to_string(kernel) + " asks for the " + IsaName(isa_) +
           " kernel, which this CPU does not support");
    }
  }
  iconv::ReadFloat(api, info, "clip_min", &clip_min_);
  iconv::ReadFloat(api, info, "clip_max", &clip_max_);
  if (isnan(clip_min_) || isnan(clip_max_)) {
    fail("attributes clip_min and clip_max must not be NaN");
  } else if (clip_min_ > clip_max_) {
    fail("attribute clip_min (" + std::to_string(clip_min_) + ") must be <= clip_max (" + std::to_string(clip_max_) +
         ")");
  }
  iconv::ReadInt(api, info, "hardswish", &hardswish_);
  iconv::ReadFloat(api, info, "hardswish_alpha", &hardswish_alpha_);
  iconv::ReadFloat(api, info, "hardswish_beta", &hardswish_beta_);
  if (hardswish_ != 0 && hardswish_ != 1) {
    fail("attribute hardswish must be 0 or 1, not " + std::to_string(hardswish_));
  } else if (!isfinite(hardswish_alpha_) || !isfinite(hardswish_beta_)) {
    fail("attributes hardswish_alpha and hardswish_beta must be finite");
  }
  std::string steps = "tensor";
  iconv::ReadString(api, info, "x_steps", &steps);
  if (steps != "tensor" && steps != "pixel") {
    fail("attribute x_steps must be \"tensor\" or \"pixel\", not \"" + steps + "\"");
  } else if (steps == "pixel") {
    pixel_steps_ = true;
    if (post) {
      fail("attribute x_steps=\"pixel\" is IntConv's and IntConvQ's only");
    } else if (kh_ != 1 || kw_ != 1 || sh_ != 1 || sw_ != 1 || group_ != 1 || pad_top_ != 0 || pad_left_ != 0 ||
               pad_bottom_ != 0 || pad_right_ != 0) {
      fail("attribute x_steps=\"pixel\" needs a 1x1 kernel, strides 1, no pads and group 1");
    }
  }
  int is_constant = 0;
  const OrtValue* constant = nullptr;
  if (OrtStatus* status = api.KernelInfoGetConstantInput_tensor(info, 1, &is_constant, &constant)) {
    api.ReleaseStatus(status);
    is_constant = 0;
  }
  w_constant_ = is_constant != 0;
  for (int i = 1; i <= 14; ++i) {
    if (i == 8) continue;  // (R: a plan never keeps it)
    is_constant = 0;
    if (OrtStatus* status = api.KernelInfoGetConstantInput_tensor(info, i, &is_constant, &constant)) {
      api.ReleaseStatus(status);
      is_constant = 0;
    }
    if (is_constant != 0) constant_ |= 1u << i;
  }
}

IntConvKernel::~IntConvKernel() = default;

OrtStatusPtr IntConvKernel::ComputeV2(OrtKernelContext* context) {
  try {
    Compute(context);
    return nullptr;
  } catch (const InvalidArgument& error) {
    return Ort::Status{error.what(), ORT_INVALID_ARGUMENT}.release();
  } catch (const Ort::Exception& error) {
    return Ort::Status{error}.release();
  } catch (const std::exception& error) {
    return Ort::Status{(std::string(name()) + ": " + error.what()).c_str(), ORT_FAIL}.release();
  }
}

namespace iconv {
// What the calls of one node share while X's shape, X's and R's element types and which inputs are
// present stay the same, and every present input of kPlanInputs is a constant initializer: the
// geometry and the checks that depend on nothing else, done once (their shape queries and vectors,
// and the per-call vectors of the factors, were about a fifth of a small layer's fixed cost per call).
// Immutable once made; IntConvKernel::plan_ holds the latest.
struct Plan {
  int64_t x_dims[4];
  bool x_bytes, r_bytes;
  uint32_t present;  // bit i: input i is present
  Geometry g;
  int64_t row_bytes;
  std::shared_ptr<const PackedWeights> pw;
  Output output;     // its constant parts (clip, hard swish, Y's and R's steps); no pointers
  bool staged;
  bool x_constant;   // x_scale and x_zero_point are constant initializers: params holds their steps
  bool r_per_sample = false;  // uint8 R with a step per sample (r_scale of N > 1 elements, read at every call)
  std::vector<qdu8::Params> params;
  std::vector<float> c_e, c_o;  // one constant step: the per-channel factors (else empty)
  std::vector<float> post_scale, post_bias;  // inputs 11 and 12, the affine map (else empty)
  AsqStep asq;                               // inputs 13 and 14, ASQ's per-sample Y step (asq.weight empty: none)
  // With c_e and c_o here (one constant step z_x, and B constant while the plan is kept): the SIMD kernels'
  // per-channel tables, laid out by the first call (int_conv_impl.h, CallTables).
  mutable CallTables tables;

  bool Matches(const int64_t* dims, bool xb, bool rb, uint32_t p) const {
    return xb == x_bytes && rb == r_bytes && p == present && std::equal(dims, dims + 4, x_dims);
  }
};

// The inputs whose shapes and values a plan keeps: W, scale, B, y_scale, y_zero_point, r_scale, r_zero_point,
// post_scale, post_bias, asq_weight, asq_log.
constexpr uint32_t kPlanInputs = (1u << 1) | (1u << 2) | (1u << 3) | (1u << 6) | (1u << 7) | (1u << 9) | (1u << 10) |
                                 (1u << 11) | (1u << 12) | (1u << 13) | (1u << 14);

namespace {
// A value's element type, rank and dimensions (rank <= 4) from one shape query, without a vector.
struct Dims {
  ONNXTensorElementDataType type;
  size_t rank;
  int64_t d[4];
};
Dims DimsOf(const Ort::ConstValue& v) {
  const Ort::TensorTypeAndShapeInfo info = v.GetTensorTypeAndShapeInfo();
  Dims dims{info.GetElementType(), info.GetDimensionsCount(), {0, 0, 0, 0}};
  if (dims.rank <= 4) Ort::ThrowOnError(Ort::GetApi().GetDimensions(info, dims.d, dims.rank));
  return dims;
}

// A call's vectors reused from call to call by the thread that runs it (grown as needed): the steps,
// the factors and the quantized X were allocated and freed on every call. `busy` keeps a second call
// on the same thread (should onnxruntime ever nest one) to its own.
struct CallScratch {
  std::vector<qdu8::Params> params;
  std::vector<float> c_e, c_o;
  std::vector<float> pixel_steps;         // per-pixel steps (IntConvKernel::ComputePixels)
  std::vector<int32_t> pixel_zero_points;
  std::vector<float> asq_y;               // ASQ's float Y before its per-sample quantization
  std::vector<float> r_steps;             // uint8 R's per-sample steps
  std::unique_ptr<uint8_t[]> xq;
  size_t xq_size = 0;
  bool busy = false;
  uint8_t* Xq(size_t size) {
    if (size > xq_size) {
      xq.reset();
      xq.reset(new uint8_t[size]);
      xq_size = size;
    }
    return xq.get();
  }
};
class ScratchLease {
 public:
  ScratchLease() {
    thread_local CallScratch reused;
    if (reused.busy) {
      own_ = std::make_unique<CallScratch>();
      scratch_ = own_.get();
    } else {
      scratch_ = &reused;
    }
    scratch_->busy = true;
  }
  ~ScratchLease() { scratch_->busy = false; }
  CallScratch* operator->() const { return scratch_; }

 private:
  std::unique_ptr<CallScratch> own_;
  CallScratch* scratch_;
};
}  // namespace
}  // namespace iconv

// An input check whose message is built only when it fails (every call runs these checks; building
// their strings cost about 1% of a small model's time in the ops).
#define ONNXQ_CHECK(ok, message)                                  \
  do {                                                            \
    if (!(ok)) throw InvalidArgument(op + ": " + (message));      \
  } while (0)

namespace {
Ort::ConstValue InputOf(Ort::KernelContext& context, size_t inputs, size_t i) {
  return i < inputs ? context.GetInput(i) : Ort::ConstValue{nullptr};
}

// Where the SIMD kernels write: Y, clipped to [clip_min, clip_max], or (`staged` not null) the output step, which
// clips itself, after the residual R.
void SetDestination(iconv::SimdArgs* args, float clip_min, float clip_max, float* y, const iconv::Output* staged) {
  args->clip_lo = staged != nullptr ? -INFINITY : clip_min;
  args->clip_hi = staged != nullptr ? INFINITY : clip_max;
  args->y = staged != nullptr ? nullptr : y;
  args->output = staged;
}
}  // namespace

std::shared_ptr<const iconv::Plan> IntConvKernel::MakePlan(Ort::KernelContext& context, bool x_bytes, bool r_bytes,
                                                           uint32_t present) {
  using iconv::SatAdd;
  using iconv::SatMul;
  using iconv::ShapeText;
  using iconv::SizeText;
  const std::string op = name();
  const size_t inputs = context.GetInputCount();
  auto input = [&](size_t i) { return InputOf(context, inputs, i); };
  auto shape_of = [](const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); };
  const Ort::ConstValue x = input(0), w = input(1), scale = input(2), bias = input(3);
  const Ort::ConstValue x_scale = input(4), x_zero_point = input(5);
  const Ort::ConstValue y_scale = input(6), y_zero_point = input(7);
  const Ort::ConstValue residual = input(8), r_scale = input(9), r_zero_point = input(10);
  const Ort::ConstValue post_scale = input(11), post_bias = input(12);
  auto plan = std::make_shared<iconv::Plan>();
  plan->x_bytes = x_bytes;
  plan->r_bytes = r_bytes;
  plan->present = present;

  const std::vector<int64_t> x_shape = shape_of(x), w_shape = shape_of(w), scale_shape = shape_of(scale);
  ONNXQ_CHECK(x_shape.size() == 4, "input X must have rank 4 (N, C, H, W), got shape " + ShapeText(x_shape));
  ONNXQ_CHECK(w_shape.size() == 2, "input W must have rank 2 (M, row_bytes), got shape " + ShapeText(w_shape));
  std::copy(x_shape.begin(), x_shape.end(), plan->x_dims);

  iconv::Geometry& g = plan->g;
  g = {};
  g.n = x_shape[0];
  g.c = x_shape[1];
  g.h = x_shape[2];
  g.w = x_shape[3];
  g.m = w_shape[0];
  g.group = group_;
  g.kh = kh_;
  g.kw = kw_;
  g.sh = sh_;
  g.sw = sw_;
  g.dh = dh_;
  g.dw = dw_;
  g.pt = pad_top_;
  g.pl = pad_left_;
  ONNXQ_CHECK(g.c % group_ == 0, "X has " + std::to_string(g.c) + " channels, not divisible by group=" +
                               std::to_string(group_));
  ONNXQ_CHECK(g.m % group_ == 0, "W has " + std::to_string(g.m) + " output channels, not divisible by group=" +
                               std::to_string(group_));
  g.cg = g.c / group_;
  g.mg = g.m / group_;
  g.k = SatMul(SatMul(g.cg, kh_), kw_);
  ONNXQ_CHECK(g.k <= iconv::kMaxK, "C/group*kh*kw = " + std::to_string(g.cg) + "*" + std::to_string(kh_) + "*" +
                                 std::to_string(kw_) + (g.k == iconv::kHuge ? "" : " = " + std::to_string(g.k)) +
                                 " is more than " + std::to_string(iconv::kMaxK) +
                                 " codes per output channel (int32 sums)");
  const int64_t row_bytes = bits_ <= 4 ? (g.k + 1) / 2 : g.k;
  plan->row_bytes = row_bytes;
  ONNXQ_CHECK(w_shape[1] == row_bytes,
        "W has " + std::to_string(w_shape[1]) + " bytes per output channel, but C/group*kh*kw = " +
            std::to_string(g.cg) + "*" + std::to_string(kh_) + "*" + std::to_string(kw_) + " = " +
            std::to_string(g.k) + " codes at " + std::to_string(bits_) + " bits take " + std::to_string(row_bytes) +
            " (X has " + std::to_string(g.c) + " channels)");
  ONNXQ_CHECK(scale_shape.size() == 1 && scale_shape[0] == g.m,
        "input scale must have shape (M,) = (" + std::to_string(g.m) + ",) like W's rows, got " +
            ShapeText(scale_shape));
  if (bias != nullptr) {
    const std::vector<int64_t> b_shape = shape_of(bias);
    ONNXQ_CHECK(b_shape.size() == 1 && b_shape[0] == g.m,
          "input B must have shape (M,) = (" + std::to_string(g.m) + ",) like W's rows, got " + ShapeText(b_shape));
  }
  const int64_t extent_h = SatAdd(SatMul(dh_, kh_ - 1), 1), extent_w = SatAdd(SatMul(dw_, kw_ - 1), 1);
  const int64_t padded_h = SatAdd(SatAdd(g.h, pad_top_), pad_bottom_);
  const int64_t padded_w = SatAdd(SatAdd(g.w, pad_left_), pad_right_);
  ONNXQ_CHECK(padded_h >= extent_h && padded_w >= extent_w,
        "the padded input (" + SizeText(padded_h) + " x " + SizeText(padded_w) + ") is smaller than the dilated kernel (" +
            SizeText(extent_h) + " x " + SizeText(extent_w) + ")");
  const int64_t area = SatMul(padded_h, padded_w);
  ONNXQ_CHECK(area <= iconv::kMaxPadded, "the padded input (" + SizeText(padded_h) + " x " + SizeText(padded_w) +
                                       ") has more than 2^40 pixels");
  ONNXQ_CHECK(SatMul(SatMul(g.n, g.c), area) <= iconv::kMaxPadded,
        "the padded input " + ShapeText({g.n, g.c, padded_h, padded_w}) + " has more than 2^40 values");
  g.oh = (padded_h - extent_h) / sh_ + 1;
  g.ow = (padded_w - extent_w) / sw_ + 1;
  // A stride past the last window changes nothing (one output row or column); as 1 it keeps the SIMD
  // kernels' stride phases (int_conv_simd.cc) within twice the padded input.
  if (g.oh == 1) g.sh = 1;
  if (g.ow == 1) g.sw = 1;

  // The epilogue's last steps (int_conv_kernels.h, Output): R added before the clip, Y quantized.
  // One positive, finite float32 step and a uint8 zero point, from inputs `step` and `zero`.
  auto one_step = [&](const Ort::ConstValue& step, const Ort::ConstValue& zero, const char* step_name,
                      const char* zero_name, float* s, int32_t* z) {
    ONNXQ_CHECK(step.GetTensorTypeAndShapeInfo().GetElementCount() == 1,
                std::string(step_name) + " must be one float32 value, got shape " + ShapeText(shape_of(step)));
    ONNXQ_CHECK(zero.GetTensorTypeAndShapeInfo().GetElementCount() == 1,
                std::string(zero_name) + " must be one uint8 value, got shape " + ShapeText(shape_of(zero)));
    *s = *step.GetTensorData<float>();
    *z = *zero.GetTensorData<uint8_t>();
    ONNXQ_CHECK(*s > 0.0f && *s <= 3.4028235e38f,
                std::string(step_name) + " must be positive and finite, got " + std::to_string(*s));
  };
  iconv::Output& output = plan->output;
  output = {};
  output.clip_lo = clip_min_;
  output.clip_hi = clip_max_;
  output.hardswish = hardswish_ != 0;
  output.hardswish_alpha = hardswish_alpha_;
  output.hardswish_beta = hardswish_beta_;
  ONNXQ_CHECK((y_scale != nullptr) == (y_zero_point != nullptr), "y_scale and y_zero_point must be given together");
  ONNXQ_CHECK(!quantized_ || y_scale != nullptr,
              "Y is uint8: inputs y_scale and y_zero_point (6 and 7, Y's step and zero point) are required");
  ONNXQ_CHECK(quantized_ || y_scale == nullptr,
              std::string("y_scale and y_zero_point quantize Y to uint8, which ") + OpName(post_, true) +
                  " does; " + op + "'s Y is float32");
  if (quantized_) {
    float s = 0.0f;
    int32_t z = 0;
    one_step(y_scale, y_zero_point, "y_scale", "y_zero_point", &s, &z);
    output.quantize = true;
    output.y_params = {s, static_cast<float>(-z), static_cast<float>(255 - z), z};
  }
  ONNXQ_CHECK((r_scale != nullptr) == (r_zero_point != nullptr), "r_scale and r_zero_point must be given together");
  if (residual != nullptr) {
    if (r_bytes) {
      ONNXQ_CHECK(r_scale != nullptr,
                  "R is uint8: inputs r_scale and r_zero_point (9 and 10, R's step and zero point) are required");
      plan->r_per_sample = g.n > 1 && r_scale.GetTensorTypeAndShapeInfo().GetElementCount() == static_cast<size_t>(g.n);
      if (plan->r_per_sample) {  // (the steps are checked at every call; the zero point here)
        ONNXQ_CHECK(r_zero_point.GetTensorTypeAndShapeInfo().GetElementCount() == 1,
                    "r_zero_point must be one uint8 value, got shape " + ShapeText(shape_of(r_zero_point)));
        output.r_zero_point = *r_zero_point.GetTensorData<uint8_t>();
      } else {
        one_step(r_scale, r_zero_point, "r_scale", "r_zero_point", &output.r_scale, &output.r_zero_point);
      }
    } else {
      ONNXQ_CHECK(r_scale == nullptr, "r_scale and r_zero_point dequantize a uint8 R; this R is float32");
    }
  } else {
    ONNXQ_CHECK(r_scale == nullptr, "r_scale and r_zero_point are given without R (input 8)");
  }
  // The per-channel affine map after the clip and the hard swish (inputs 11 and 12).
  ONNXQ_CHECK((post_scale != nullptr) == (post_bias != nullptr), "post_scale and post_bias must be given together");
  if (post_scale != nullptr) {
    for (const auto& [value, value_name] : {std::pair{post_scale, "post_scale"}, std::pair{post_bias, "post_bias"}}) {
      const std::vector<int64_t> shape = shape_of(value);
      ONNXQ_CHECK(shape.size() == 1 && shape[0] == g.m, std::string("input ") + value_name + " must have shape (M,) = (" +
                                                            std::to_string(g.m) + ",) like W's rows, got " + ShapeText(shape));
    }
    plan->post_scale.assign(post_scale.GetTensorData<float>(), post_scale.GetTensorData<float>() + g.m);
    plan->post_bias.assign(post_bias.GetTensorData<float>(), post_bias.GetTensorData<float>() + g.m);
  }
  // ASQ's step per sample for Y (inputs 13 and 14, output 1).
  const Ort::ConstValue asq_weight = input(13), asq_log = input(14);
  ONNXQ_CHECK((asq_weight != nullptr) == (asq_log != nullptr), "asq_weight and asq_log must be given together");
  if (asq_weight != nullptr) {
    ONNXQ_CHECK(quantized_, std::string("asq_weight and asq_log give a uint8 Y a step per sample; ") + op +
                                "'s Y is float32");
    ONNXQ_CHECK(context.GetOutputCount() >= 2, "asq_weight and asq_log need output 1 (Y's steps, one per sample)");
    const std::vector<int64_t> w_shape_asq = shape_of(asq_weight);
    ONNXQ_CHECK(w_shape_asq.size() == 1 && w_shape_asq[0] == g.m, "input asq_weight must have shape (M,) = (" +
                                                                      std::to_string(g.m) + ",), got " +
                                                                      ShapeText(w_shape_asq));
    ONNXQ_CHECK(asq_log.GetTensorTypeAndShapeInfo().GetElementCount() == 3,
                "input asq_log must hold 3 float32 values (bias, log_min, log_max), got shape " +
                    ShapeText(shape_of(asq_log)));
    const float* log = asq_log.GetTensorData<float>();
    ONNXQ_CHECK(isfinite(log[0]) && isfinite(log[1]) && isfinite(log[2]) && log[1] <= log[2],
                "asq_log (bias, log_min, log_max) must be finite with log_min <= log_max");
    plan->asq.weight.assign(asq_weight.GetTensorData<float>(), asq_weight.GetTensorData<float>() + g.m);
    plan->asq.bias = log[0];
    plan->asq.log_min = log[1];
    plan->asq.log_max = log[2];
    plan->asq.scale = output.y_params.scale;
  }
  // With none of them (nor a hard swish), the kernels write Y (float) themselves, clipped as before.
  plan->staged = quantized_ || residual != nullptr || hardswish_ != 0 || post_scale != nullptr;

  ONNXQ_CHECK((x_scale != nullptr) == (x_zero_point != nullptr), "x_scale and x_zero_point must be given together");
  ONNXQ_CHECK(!x_bytes || x_scale != nullptr,
              "X is uint8 (quantized already): inputs x_scale and x_zero_point (4 and 5, its step and zero point) "
              "are required");
  ONNXQ_CHECK(!pixel_steps_ || !x_bytes, "X is uint8, but x_steps=\"pixel\" quantizes a float X itself");
  ONNXQ_CHECK(!pixel_steps_ || x_scale == nullptr,
              "x_steps=\"pixel\" computes each pixel's step itself: inputs x_scale and x_zero_point must be absent");
  constexpr uint32_t kSteps = (1u << 4) | (1u << 5);
  plan->x_constant = x_scale != nullptr && (constant_ & kSteps) == kSteps;
  if (plan->x_constant) {
    ReadSteps(context, g, &plan->params);
    if (plan->params.size() == 1) Factors(scale.GetTensorData<float>(), g.m, plan->params[0], &plan->c_e, &plan->c_o);
  }

  // Weights: prepared once while W is a constant initializer.
  const auto* w_data = w.GetTensorData<uint8_t>();
  if (w_constant_) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!cached_ || cached_->k != g.k) cached_ = iconv::Prepare(g, w_data, row_bytes, bits_, post_, isa_);
    plan->pw = cached_;
  } else {
    plan->pw = iconv::Prepare(g, w_data, row_bytes, bits_, post_, isa_);
  }
  return plan;
}

// The calibrated steps (inputs x_scale and x_zero_point, both present) into params: params[0] for the
// whole batch, or params[n] for sample n (x_scale with N elements).
void IntConvKernel::ReadSteps(Ort::KernelContext& context, const iconv::Geometry& g,
                              std::vector<qdu8::Params>* params) const {
  using iconv::ShapeText;
  const std::string op = name();
  const Ort::ConstValue x_scale = context.GetInput(4), x_zero_point = context.GetInput(5);
  auto shape_of = [](const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); };
  const size_t steps = x_scale.GetTensorTypeAndShapeInfo().GetElementCount();
  ONNXQ_CHECK(x_zero_point.GetTensorTypeAndShapeInfo().GetElementCount() == 1,
        "x_zero_point must be one uint8 value, got shape " + ShapeText(shape_of(x_zero_point)));
  ONNXQ_CHECK(steps == 1 || steps == static_cast<size_t>(g.n),
        "x_scale must have 1 element or N = " + std::to_string(g.n) + " (one step per sample), got shape " +
            ShapeText(shape_of(x_scale)));
  const float* s_data = x_scale.GetTensorData<float>();
  const int32_t z = *x_zero_point.GetTensorData<uint8_t>();
  const bool per_sample = steps != 1;
  params->resize(steps);
  for (size_t i = 0; i < steps; ++i) {
    const float s = s_data[i];
    ONNXQ_CHECK(s > 0.0f && s <= 3.4028235e38f, std::string("x_scale") + (per_sample ? "[" + std::to_string(i) + "]" : "") +
                                              " must be positive and finite, got " + std::to_string(s));
    (*params)[i] = {s, static_cast<float>(-z), static_cast<float>(255 - z), z};
  }
}

// The per-channel float factors (int_conv.h) of step p: c_e, c_o of M channels.
void IntConvKernel::Factors(const float* scale_data, int64_t m_count, const qdu8::Params& p, std::vector<float>* c_e,
                            std::vector<float>* c_o) const {
  c_e->resize(static_cast<size_t>(m_count));
  c_o->resize(static_cast<size_t>(m_count));
  const int32_t k2 = ((1 << (bits_ - 1)) - 1) / 2;
  const float step = ldexpf(1.0f, -k2);
  for (int64_t m = 0; m < m_count; ++m) {
    const float c = p.scale * scale_data[m];
    if (post_) {
      (*c_e)[m] = c * step;
      (*c_o)[m] = (*c_e)[m] * 0.70710678118654752f;
    } else {
      (*c_e)[m] = c;
      (*c_o)[m] = 0.0f;
    }
  }
}

void IntConvKernel::Compute(OrtKernelContext* raw_context) {
  using iconv::ShapeText;
  Ort::KernelContext context{raw_context};
  const std::string op = name();
  const size_t inputs = context.GetInputCount();
  auto shape_of = [](const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); };

  // Each input asked of onnxruntime once (a call through its C API each).
  Ort::ConstValue given[15];
  uint32_t present = 0;
  for (size_t i = 0; i < inputs && i < 15; ++i) {
    given[i] = context.GetInput(i);
    if (given[i] != nullptr) present |= 1u << i;
  }
  const Ort::ConstValue x = given[0], w = given[1], scale = given[2], bias = given[3];
  const Ort::ConstValue x_scale = given[4], residual = given[8];
  ONNXQ_CHECK(x != nullptr && w != nullptr && scale != nullptr, "inputs X, W and scale are required");
  // X float32, or uint8: then X is x_q itself (onnxruntime only lets these two through).
  const iconv::Dims x_dims = iconv::DimsOf(x);
  const bool x_bytes = x_dims.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  iconv::Dims r_dims{};
  if (residual != nullptr) r_dims = iconv::DimsOf(residual);
  const bool r_bytes = residual != nullptr && r_dims.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;

  // The plan: the last one while it matches and its inputs are constant, else made (and kept) now.
  const bool reusable = x_dims.rank == 4 && (present & iconv::kPlanInputs & ~constant_) == 0;
  std::shared_ptr<const iconv::Plan> plan;
  if (reusable) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (plan_ && plan_->Matches(x_dims.d, x_bytes, r_bytes, present)) plan = plan_;
  }
  if (!plan) {
    plan = MakePlan(context, x_bytes, r_bytes, present);
    if (reusable) {
      std::lock_guard<std::mutex> lock(mutex_);
      plan_ = plan;
    }
  }
  const iconv::Geometry& g = plan->g;
  const iconv::PackedWeights& pw = *plan->pw;
  const bool staged = plan->staged;

  iconv::Output output = plan->output;
  if (!plan->post_scale.empty()) {
    output.post_scale = plan->post_scale.data();
    output.post_bias = plan->post_bias.data();
    output.pixels = g.oh * g.ow;
    output.channels = g.m;
  }
  if (residual != nullptr) {
    ONNXQ_CHECK(r_dims.rank == 4 && r_dims.d[0] == g.n && r_dims.d[1] == g.m && r_dims.d[2] == g.oh &&
                    r_dims.d[3] == g.ow,
                "input R (the residual) must have Y's shape (N, M, OH, OW) = " + ShapeText({g.n, g.m, g.oh, g.ow}) +
                    ", got " + ShapeText(shape_of(residual)));
    if (r_bytes) {
      output.r8 = residual.GetTensorData<uint8_t>();
    } else {
      output.r = residual.GetTensorData<float>();
    }
  }
  const float* bias_data = bias != nullptr ? bias.GetTensorData<float>() : nullptr;

  // Per-pixel steps over a single pixel are the whole tensor's: the steps of one tensor give the same bits faster
  // (tools/bench_ops.py --tensor-steps, a Gemm of one row: per-pixel passes cost 7 to 20% of the op).
  if (pixel_steps_ && g.n * g.h * g.w > 1) return ComputePixels(context, *plan, output, bias_data);
  iconv::ScratchLease scratch;

  // Activation quantization: calibrated (one step, or one per sample), or DynamicQuantizeLinear's.
  const auto sample = static_cast<size_t>(g.c * g.h * g.w);
  const auto count = static_cast<size_t>(g.n) * sample;
  const float* x_data = x_bytes ? nullptr : x.GetTensorData<float>();
  const uint8_t* x_codes = x_bytes ? x.GetTensorData<uint8_t>() : nullptr;
  const Kernels& kernels = KernelsFor(isa_);
  const std::vector<qdu8::Params>* params = &plan->params;
  if (!plan->x_constant) {
    params = &scratch->params;
    if (x_scale != nullptr) {
      ReadSteps(context, g, &scratch->params);
    } else {
      float mn = INFINITY, mx = -INFINITY;
      kernels.min_max(x_data, count, &mn, &mx);
      scratch->params.assign(1, qdu8::MakeParams(mn, mx));
    }
  }

  // X quantized (per sample with per-sample steps), unless the depthwise kernels quantize it
  // channel by channel as they go.
  // (uint8 X: every kernel reads X as it is.)
  const bool fused = isa_ != Isa::kScalar && g.n > 0 && g.m > 0 && g.k > 0 && iconv::UsesFusedDepthwise(g, pw, isa_);
  const bool quantize = !fused && !x_bytes;
  // The SIMD tables quantize with quantize_fused (a multiply-add on a fixed-point grid, dividing only
  // near a tie: QuantizeOne's bytes, about twice the division's speed), which writes up to 64 bytes
  // past its values: the buffer has that slack, and samples are quantized in order (each one's slack
  // is the next one's start, rewritten).
  constexpr size_t kQuantizeSlack = 64;
  // (Not value-initialized: every byte is written below, the slack here; zeroing it first cost the
  // first convolution of an image model a pass over its batch of bytes.)
  uint8_t* const xq = quantize ? scratch->Xq(count + kQuantizeSlack) : nullptr;
  if (quantize) std::memset(xq + count, 0, kQuantizeSlack);
  auto quantize_x = [&](const float* from, size_t n, const qdu8::Params& p, uint8_t* to) {
    if (kernels.quantize_fused == nullptr) {
      kernels.quantize(from, n, p, to);
      return;
    }
    iconv::DepthwiseFused q = iconv::FixedQuantization(p);
    q.x = from;
    kernels.quantize_fused(q, static_cast<int64_t>(n), to);
  };
  if (quantize && params->size() == 1) {
    quantize_x(x_data, count, (*params)[0], xq);
  } else if (quantize) {
    for (int64_t n = 0; n < g.n; ++n) quantize_x(x_data + n * sample, sample, (*params)[n], xq + n * sample);
  }
  const uint8_t* xq_data = x_bytes ? x_codes : quantize ? xq : nullptr;

  float* y = BindOutput(context, g, &output);
  // ASQ: the kernels write float Y into scratch, quantized sample by sample with its own step at the end.
  const bool asq = plan->asq.present();
  uint8_t* const asq_codes = output.y8;
  float* const asq_steps = asq ? context.GetOutput(1, {g.n}).GetTensorMutableData<float>() : nullptr;
  if (asq) {
    scratch->asq_y.resize(static_cast<size_t>(g.n * g.m * g.oh * g.ow));
    output.quantize = false;
    output.y8 = nullptr;
    output.y = scratch->asq_y.data();
  }
  const float* r_steps = nullptr;
  if (plan->r_per_sample) r_steps = ReadResidualSteps(context, g, &scratch->r_steps);
  if (g.n == 0 || g.m == 0) {  // Y is empty (W's codes are checked all the same)
    if (asq) QuantizeSamples(*plan, kernels, scratch->asq_y.data(), asq_codes, asq_steps);
    return;
  }

  // One run of the kernels over the images of `run` (all of X, or one sample with its own step):
  // the per-channel float factors (int_conv.h) from s_x, then the integer path and the epilogue.
  const float* scale_data = scale.GetTensorData<float>();
  // Y of the run from element y_at: float (y) written by the kernels, or through the output step.
  auto run_images = [&](const iconv::Geometry& run, const qdu8::Params& p, const float* run_x, const uint8_t* run_xq,
                        int64_t y_at) {
    float* run_y = staged ? nullptr : y + y_at;
    iconv::Output run_output = output;
    if (output.r != nullptr) run_output.r += y_at;
    if (output.r8 != nullptr) run_output.r8 += y_at;
    if (output.y != nullptr) run_output.y += y_at;
    if (output.y8 != nullptr) run_output.y8 += y_at;
    const float *c_e = plan->c_e.data(), *c_o = plan->c_o.data();
    if (plan->c_e.empty()) {
      Factors(scale_data, g.m, p, &scratch->c_e, &scratch->c_o);
      c_e = scratch->c_e.data();
      c_o = scratch->c_o.data();
    }
    const auto z = static_cast<uint8_t>(p.zero_point);
    if (isa_ == Isa::kScalar || g.k == 0) {  // (K = 0: no sums, Y = B or 0; the SIMD kernels assume K >= 1)
      iconv::ReferenceConv(run, pw, post_, bits_, run_xq, z, c_e, c_o, bias_data, clip_min_, clip_max_, run_y,
                           staged ? &run_output : nullptr);
      return;
    }
    iconv::SimdArgs args{};
    args.g = &run;
    args.pw = &pw;
    args.isa = isa_;
    args.post = post_;
    args.z = z;
    args.xq = run_xq;
    args.x = run_x;  // read by the fused depthwise kernels instead of xq (which is then null)
    args.x_scale = p.scale;
    args.x_lo = p.lo;
    args.x_hi = p.hi;
    args.c_e = c_e;
    args.c_o = c_o;
    args.bias = bias_data;
    SetDestination(&args, clip_min_, clip_max_, run_y, staged ? &run_output : nullptr);
    args.pad_bottom = pad_bottom_;
    args.pad_right = pad_right_;
    if (!plan->c_e.empty()) args.tables = &plan->tables;  // (z_x, c_e, c_o and B the plan's, every call)
    iconv::SimdConv(args, context);
  };
  if (params->size() == 1 && r_steps == nullptr) {
    run_images(g, (*params)[0], x_data, xq_data, 0);
  } else {
    // Per-sample steps (X's or R's): each sample is its own one-image call (the zero points are shared).
    iconv::Geometry one = g;
    one.n = 1;
    const int64_t outputs = g.m * g.oh * g.ow;
    for (int64_t n = 0; n < g.n; ++n) {
      if (r_steps != nullptr) output.r_scale = r_steps[n];
      run_images(one, (*params)[params->size() == 1 ? 0 : n], x_bytes ? nullptr : x_data + n * sample,
                 xq_data != nullptr ? xq_data + n * sample : nullptr, n * outputs);
    }
  }
  if (asq) QuantizeSamples(*plan, kernels, scratch->asq_y.data(), asq_codes, asq_steps);
}

// uint8 R's steps, one per sample (input r_scale of N elements), each checked, into `steps`.
const float* IntConvKernel::ReadResidualSteps(Ort::KernelContext& context, const iconv::Geometry& g,
                                              std::vector<float>* steps) const {
  const std::string op = name();
  const float* data = context.GetInput(9).GetTensorData<float>();
  steps->assign(data, data + g.n);
  for (int64_t n = 0; n < g.n; ++n) {
    const float s = (*steps)[n];
    ONNXQ_CHECK(s > 0.0f && s <= 3.4028235e38f,
                "r_scale[" + std::to_string(n) + "] must be positive and finite, got " + std::to_string(s));
  }
  return steps->data();
}

// ASQ (int_conv.h, inputs 13 and 14): each sample's step from its float y, written to output 1, and its
// y quantized with it (and y_zero_point) into the uint8 Y, as the Q ops quantize with y_scale.
void IntConvKernel::QuantizeSamples(const iconv::Plan& plan, const Kernels& kernels, const float* y, uint8_t* codes,
                                    float* steps) const {
  const iconv::Geometry& g = plan.g;
  const int64_t pixels = g.oh * g.ow, outputs = g.m * pixels;
  const int32_t z = plan.output.y_params.zero_point;
  for (int64_t n = 0; n < g.n; ++n) {
    const float step = plan.asq.Of(y + n * outputs, pixels);
    steps[n] = step;
    const qdu8::Params p{step, static_cast<float>(-z), static_cast<float>(255 - z), z};
    kernels.quantize(y + n * outputs, static_cast<size_t>(outputs), p, codes + n * outputs);
  }
}

// Y of shape (N, M, OH, OW) into `output`: its uint8 codes (the Q ops) or its floats; returns the
// floats (nullptr for uint8 Y).
float* IntConvKernel::BindOutput(Ort::KernelContext& context, const iconv::Geometry& g, iconv::Output* output) const {
  Ort::UnownedValue y_value = context.GetOutput(0, {g.n, g.m, g.oh, g.ow});
  if (quantized_) {
    output->y8 = y_value.GetTensorMutableData<uint8_t>();
    return nullptr;
  }
  output->y = y_value.GetTensorMutableData<float>();
  return output->y;
}

// x_steps = "pixel" (int_conv.h): each pixel's steps from its range, X quantized with them, then the
// kernel with the per-pixel epilogue (the SIMD kernels' Gemm, or the scalar reference, which also
// runs C = 1: Prepare lays that out for the depthwise kernels).
void IntConvKernel::ComputePixels(Ort::KernelContext& context, const iconv::Plan& plan, iconv::Output output,
                                  const float* bias_data) {
  const iconv::Geometry& g = plan.g;
  const int64_t pixels = g.h * g.w, count = g.n * pixels;
  float* y = BindOutput(context, g, &output);
  if (g.n == 0 || g.m == 0) return;
  const float* x = context.GetInput(0).GetTensorData<float>();
  const float* scale = context.GetInput(2).GetTensorData<float>();
  const Kernels& kernels = KernelsFor(isa_);
  // Per pixel, in this thread's vectors kept from call to call: s_x, lo, hi, 1 / s_x (qdu8::PixelSteps), the
  // range's min and max while they are found, and z_x; X quantized.
  iconv::ScratchLease scratch;
  std::vector<float>& steps = scratch->pixel_steps;
  std::vector<int32_t>& zero_points = scratch->pixel_zero_points;
  steps.resize(static_cast<size_t>(6 * count));
  zero_points.resize(static_cast<size_t>(count));
  uint8_t* const xq = scratch->Xq(static_cast<size_t>(g.n * g.c * pixels));
  float* const mn = steps.data() + 4 * count;
  float* const mx = steps.data() + 5 * count;
  for (int64_t n = 0; n < g.n; ++n) {
    const int64_t first = n * pixels;
    kernels.min_max_pixels(x + n * g.c * pixels, g.c, pixels, mn + first, mx + first);
    bool divide = false;
    for (int64_t p = first; p < first + pixels; ++p) {
      const qdu8::Params params = qdu8::MakeParams(mn[p], mx[p]);
      steps[p] = params.scale;
      steps[count + p] = params.lo;
      steps[2 * count + p] = params.hi;
      steps[3 * count + p] = iconv::FusedInverse(params.scale);
      divide = divide || steps[3 * count + p] == 0.0f;
      zero_points[p] = params.zero_point;
    }
    const qdu8::PixelSteps s{steps.data() + first,       steps.data() + count + first,
                             steps.data() + 2 * count + first, zero_points.data() + first,
                             steps.data() + 3 * count + first, divide};
    kernels.quantize_pixels(x + n * g.c * pixels, g.c, pixels, s, xq + n * g.c * pixels);
  }
  const bool staged = plan.staged;
  const iconv::PackedWeights& pw = *plan.pw;
  if (isa_ == Isa::kScalar || g.k == 0 || pw.mode != iconv::Mode::kQuad) {
    iconv::ReferencePixels(g, pw, xq, zero_points.data(), steps.data(), scale, bias_data, clip_min_, clip_max_,
                           staged ? nullptr : y, staged ? &output : nullptr);
    return;
  }
  iconv::SimdArgs args{};
  args.g = &g;
  args.pw = &pw;
  args.isa = isa_;
  args.xq = xq;
  args.c_e = scale;  // (per-pixel steps: the weight scales; each pixel's factor is s_x * scale[m])
  args.c_o = scale;
  args.bias = bias_data;
  args.z_pixels = zero_points.data();
  args.s_pixels = steps.data();
  SetDestination(&args, clip_min_, clip_max_, y, staged ? &output : nullptr);
  iconv::SimdConv(args, context);
}

#undef ONNXQ_CHECK

OrtStatusPtr IntConvOp::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
  try {
    auto created = std::make_unique<IntConvKernel>(post_, quantized_, api, info);
    if (!created->error().empty()) return api.CreateStatus(ORT_INVALID_ARGUMENT, created->error().c_str());
    *kernel = created.release();
    return nullptr;
  } catch (const std::exception& error) {
    return api.CreateStatus(ORT_FAIL, error.what());
  }
}

ONNXTensorElementDataType IntConvOp::GetInputType(size_t index) const {
  if (index == 0) return x_type_;
  if (index == 8) return r_type_;
  return index == 1 || index == 5 || index == 7 || index == 10 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
                                                               : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

OrtCustomOpInputOutputCharacteristic IntConvOp::GetInputCharacteristic(size_t index) const {
  return index < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

}  // namespace onnxq
