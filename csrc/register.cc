// RegisterCustomOps, the library's one exported function: onnxruntime calls it when a session
// loads libonnxq_ops.so (SessionOptions.register_custom_ops_library) and it adds onnxq's ops,
// in domain ONNXQ_DOMAIN (from onnxq/domain.py), to that session.
#include <exception>
#include <string>

#include "kernels/int_conv.h"
#include "kernels/max_pool_q.h"
#include "kernels/quantize_dynamic_u8.h"
#include "onnxruntime_lite_custom_op.h"

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  // Ask for the API version of the headers we were built with; an older onnxruntime refuses it.
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    const std::string message = "onnxq: libonnxq_ops was built with onnxruntime API version " +
                                std::to_string(ORT_API_VERSION) + " headers, newer than this onnxruntime (" +
                                api_base->GetVersionString() + "); upgrade onnxruntime or rebuild onnxq";
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);
  try {
    // One domain and one instance of each op for the whole process, never freed: every session
    // keeps pointers to them, and freeing them at exit could race onnxruntime's own teardown.
    static OrtCustomOpDomain* const domain = [] {
      Ort::CustomOpDomain ops{ONNXQ_DOMAIN};
      ops.Add(Ort::Custom::CreateLiteCustomOp<onnxq::QuantizeDynamicU8>("QuantizeDynamicU8", "CPUExecutionProvider"));
      ops.Add(Ort::Custom::CreateLiteCustomOp<onnxq::MaxPoolQ>("MaxPoolQ", "CPUExecutionProvider"));
      // PostConv, IntConv (float Y), PostConvQ, IntConvQ (uint8 Y), each once per element type of X
      // and of R (float or uint8): onnxruntime picks the one that matches the node's inputs.
      constexpr ONNXTensorElementDataType kTypes[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                                      ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8};
      for (const bool quantized : {false, true}) {
        for (const bool post : {true, false}) {
          for (const auto x_type : kTypes) {
            for (const auto r_type : kTypes) ops.Add(new onnxq::IntConvOp(post, quantized, x_type, r_type));
          }
        }
      }
      return ops.release();
    }();
    Ort::UnownedSessionOptions{options}.Add(domain);
  } catch (const std::exception& error) {
    return Ort::Status{error}.release();
  }
  return nullptr;
}
