"""ONNX INT4 packing (onnxq.numerics.packing), checked by hand-written bytes and by onnxruntime's
own DequantizeLinear reading the packed initializer."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.numerics.packing import pack_int4, unpack_int4
from onnxq.rewrite.qdq import integer_tensor

ALL_INT4 = np.arange(-8, 8, dtype=np.int8)


def ref_pack(values: list[int]) -> bytes:
    """Element 2i in the low nibble of byte i, element 2i+1 in the high nibble, two's complement."""
    nibbles = [v & 0xF for v in values] + ([0] if len(values) % 2 else [])
    return bytes(lo | (hi << 4) for lo, hi in zip(nibbles[0::2], nibbles[1::2]))


# ---------------------------------------------------------------- bytes


@pytest.mark.parametrize(
    "values, expected",
    [
        ([1, -1], b"\xf1"),
        ([-8, 7, 3], b"\x78\x03"),
        ([0], b"\x00"),
        ([7], b"\x07"),
        ([-1], b"\x0f"),
        ([0, -8], b"\x80"),
        ([2, 3, -2, -3], b"\x32\xde"),
        ([], b""),
    ],
)
def test_pack_int4_byte_layout(values: list[int], expected: bytes) -> None:
    """Hand-written examples: low nibble first, sign in two's complement, odd tail padded with 0."""
    assert ref_pack(values) == expected  # the reference agrees with the hand-written bytes
    assert pack_int4(np.array(values, dtype=np.int8)) == expected
    assert pack_int4(np.array(values, dtype=np.int64)) == expected  # any integer dtype
    np.testing.assert_array_equal(unpack_int4(expected, len(values)), np.array(values, dtype=np.int8))


@pytest.mark.parametrize("count", [1, 2, 15, 16, 17, 32, 33, 1001])
def test_round_trip_even_and_odd_lengths(count: int) -> None:
    """pack then unpack returns the values (int8) for even and odd counts; byte count is ceil(n/2)."""
    rng = np.random.default_rng(count)
    values = rng.integers(-8, 8, size=count).astype(np.int8)
    if count >= 16:
        values[:16] = ALL_INT4  # every representable value appears
    packed = pack_int4(values)
    assert len(packed) == (count + 1) // 2
    assert packed == ref_pack(values.tolist())
    out = unpack_int4(packed, count)
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out, values)


def test_all_sixteen_values_and_pairs() -> None:
    """Every ordered pair of int4 values packs into its own byte and unpacks back."""
    a, b = np.meshgrid(ALL_INT4, ALL_INT4, indexing="ij")
    pairs = np.stack([a.ravel(), b.ravel()], axis=1).ravel()
    packed = pack_int4(pairs)
    assert sorted(packed) == list(range(256))  # 256 distinct bytes
    np.testing.assert_array_equal(unpack_int4(packed, pairs.size), pairs)


def test_multidimensional_input_is_row_major() -> None:
    """A 2-D array packs in C order, the same as its ravel()."""
    values = np.array([[1, 2, 3], [-4, -5, -6]], dtype=np.int8)
    assert pack_int4(values) == ref_pack([1, 2, 3, -4, -5, -6])


@pytest.mark.parametrize("bad", [[8], [-9], [0, 1, 100], [-128, 0]])
def test_out_of_range_values_raise(bad: list[int]) -> None:
    """Values outside [-8, 7] are refused rather than wrapped."""
    with pytest.raises(ValueError):
        pack_int4(np.array(bad, dtype=np.int64))


def test_unpack_too_few_bytes_raises() -> None:
    """Asking for more values than the bytes hold is an error."""
    with pytest.raises(ValueError):
        unpack_int4(b"\x11\x22", 5)


# ---------------------------------------------------------------- onnxruntime DequantizeLinear


def run_dequantize(codes_tensor: onnx.TensorProto, scale: np.ndarray, axis: int | None, shape: tuple[int, ...]) -> np.ndarray:
    """Run an opset-21 graph 'y = DequantizeLinear(codes, scale[, axis])' in onnxruntime."""
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node("DequantizeLinear", ["codes", "scale"], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "dq",
        inputs=[],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        initializer=[codes_tensor, numpy_helper.from_array(scale.astype(np.float32), "scale")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {})[0]


def int4_tensor(name: str, codes: np.ndarray) -> onnx.TensorProto:
    """An INT4 initializer built by hand around pack_int4."""
    tensor = onnx.TensorProto(name=name, data_type=TensorProto.INT4, dims=codes.shape)
    tensor.raw_data = pack_int4(codes)
    return tensor


def ref_dequantize(codes: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """codes * scale in float32, the scale broadcast along ``axis``."""
    s = np.asarray(scale, np.float32)
    if axis is not None:
        shape = [1] * codes.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    return codes.astype(np.float32) * s


@pytest.mark.parametrize(
    "shape, axis",
    [((7,), None), ((3, 5, 3), None), ((3, 5, 3), 0), ((3, 5, 3), 1), ((5, 3), 1), ((9, 1, 1, 3), 0), ((4, 4), 0), ((1,), 0)],
)
def test_onnxruntime_reads_packed_int4(shape: tuple[int, ...], axis: int | None) -> None:
    """onnxruntime's DequantizeLinear on a pack_int4 initializer gives codes*scale bit-exactly,
    per tensor and per axis, for odd element counts too."""
    rng = np.random.default_rng(sum(shape) + (axis or 0))
    codes = rng.integers(-8, 8, size=shape).astype(np.int8)
    flat = codes.reshape(-1)
    flat[: min(16, flat.size)] = ALL_INT4[: min(16, flat.size)]
    scale = rng.uniform(1e-3, 3.0, size=() if axis is None else (shape[axis],)).astype(np.float32)
    got = run_dequantize(int4_tensor("codes", codes), scale, axis, shape)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(got, ref_dequantize(codes, scale, axis))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_onnxruntime_reads_rewrite_integer_tensor(bits: int) -> None:
    """onnxq.rewrite.qdq.integer_tensor (INT4 for <= 4 bits, INT8 above) is read back exactly too."""
    q = 2 ** (bits - 1) - 1
    shape = (3, 5, 3)
    rng = np.random.default_rng(bits)
    codes = rng.integers(-q, q + 1, size=shape).astype(np.int8)
    tensor = integer_tensor("codes", codes, bits)
    assert tensor.data_type == (TensorProto.INT4 if bits <= 4 else TensorProto.INT8)
    scale = rng.uniform(0.01, 1.0, size=shape[1]).astype(np.float32)
    got = run_dequantize(tensor, scale, 1, shape)
    np.testing.assert_array_equal(got, ref_dequantize(codes, scale, 1))


@pytest.mark.parametrize("count", [0, 1, 2, 7, 8, 33])
def test_halves_layout_and_round_trip(count):
    """Byte i holds code i + 8 in its low nibble and code i + ceil(n/2) + 8 in its high one (an odd count pads with 0)."""
    from onnxq.numerics.packing import pack_halves, unpack_halves

    codes = np.random.default_rng(count).integers(-8, 8, count).astype(np.int8)
    packed = pack_halves(codes)
    half = (count + 1) // 2
    padded = list(codes) + [0] * (2 * half - count)
    expected = [(int(padded[i]) + 8) | ((int(padded[i + half]) + 8) << 4) for i in range(half)]
    assert packed.dtype == np.uint8 and packed.tolist() == expected
    np.testing.assert_array_equal(unpack_halves(packed, count), codes)


def test_halves_reject_values_outside_4_bits():
    from onnxq.numerics.packing import pack_halves

    with pytest.raises(ValueError):
        pack_halves(np.array([8], dtype=np.int8))
    with pytest.raises(TypeError):
        pack_halves(np.array([0.5]))
