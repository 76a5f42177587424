"""Pure numerics on numpy arrays, nothing of ONNX: REQuant's range search, uniform/sqrt and POST codes, int4 packing."""
