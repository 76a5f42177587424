"""onnxq's compiled code and onnxruntime: the op library's path, sessions, the op domain, CPU flags, the counting library."""
