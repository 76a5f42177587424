"""The op domains onnxq writes nodes into, and those ops' names: its own (defined once: CMakeLists.txt reads DOMAIN from
here for the C++ library) and onnxruntime's contrib domain, whose embedding lookup it uses.
"""

from __future__ import annotations

# CMakeLists.txt parses this exact line (DOMAIN = "..."); keep it a plain string literal.
DOMAIN = "ai.onnxq"
#: The version of onnxq's domain that the op library registers.
DOMAIN_VERSION = 1
#: onnxq's integer convolution (uniform codes) and its shift convolution (POST codes).
INT_CONV = "IntConv"
POST_CONV = "PostConv"

#: onnxruntime's contrib domain (in every onnxruntime build) and the embedding lookup onnxq writes into it.
ORT_DOMAIN = "com.microsoft"
LOOKUP_OP = "GatherBlockQuantized"
