"""The op domains onnxq writes nodes into, and the names of those ops.

onnxq's own domain is defined here once (CMakeLists.txt reads DOMAIN from this file for the C++ library); onnxruntime's
contrib domain holds the embedding lookup onnxq writes.
"""

from __future__ import annotations

# CMakeLists.txt parses this exact line (DOMAIN = "..."); keep it a plain string literal.
DOMAIN = "ai.onnxq"
#: The version of onnxq's domain that the op library registers.
DOMAIN_VERSION = 1
#: onnxq's integer convolution (uniform codes) and its shift convolution (POST codes).
INT_CONV = "IntConv"
POST_CONV = "PostConv"
#: Both, as the rewrite writes them (before a chain renames the links IntConvQ/PostConvQ).
CONV_OPS = (INT_CONV, POST_CONV)
#: The same ops writing their output as uint8 codes with a given step (y_scale, y_zero_point): the links of a uint8 chain.
INT_CONV_Q = "IntConvQ"
POST_CONV_Q = "PostConvQ"
#: DequantizeLinear -> MaxPool -> QuantizeLinear on uint8 codes in one op (onnxq/rewrite/between.py, pool_codes).
MAX_POOL_Q = "MaxPoolQ"

#: onnxruntime's contrib domain (in every onnxruntime build) and the embedding lookup onnxq writes into it.
ORT_DOMAIN = "com.microsoft"
LOOKUP_OP = "GatherBlockQuantized"
#: onnxruntime's MatMul over b-bit codes in blocks along K, which onnxq writes for 8-bit weight-only MatMuls.
MATMUL_NBITS = "MatMulNBits"
#: onnxruntime's MatMul of 8-bit codes with a float output (and a bias), which onnxq writes for small QDQ MatMuls
#: whose output stays float (onnxq/rewrite/integer_matmuls.py).
MATMUL_INTEGER_TO_FLOAT = "MatMulIntegerToFloat"
