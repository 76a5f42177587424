"""Graph rewrites that write the quantized model: weight and activation QDQ, onnxq's ops, embedding lookups, fusions."""
