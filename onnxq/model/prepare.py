"""Graph preparation before quantization: names, Constant weights, constant weight paths, BatchNorm folding, shapes.

Each pass edits the model in place and returns how many things it changed.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.model.external import is_external
from onnxq.model.fused_conv import fused_ops_to_standard
from onnxq.model.fused_matmul import fused_matmuls_to_matmul
from onnxq.model.gemm_first import gemm_weight_first_to_matmul
from onnxq.model.graph import (
    NameSource,
    all_graphs,
    attribute,
    constant_initializers,
    consumers,
    defined_names,
    is_op,
    remove_unused_initializers,
    rename_input,
    subgraphs,
    to_array,
)
from onnxq.model.opset import default_opset, is_default_domain
from onnxq.model.skeleton import compact, on_skeleton
from onnxq.plan.handlers import CODE_TYPES, FLOAT_TYPES, HANDLERS, RECURRENT_WEIGHTS

logger = logging.getLogger(__name__)


def name_nodes(graph: onnx.GraphProto) -> int:
    """Give every unnamed node a unique name so reports and --exclude can refer to it.

    ``<OpType>_<index>``, and inside a control-flow body ``<If/Loop/Scan node>/<OpType>_<index>`` (as ``onnxq inspect`` shows it).
    """
    return _name_nodes(graph, NameSource(graph), "")


def _name_nodes(graph: onnx.GraphProto, names: NameSource, prefix: str) -> int:
    changed = 0
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = names.fresh(f"{prefix}{node.op_type}_{i}")
            changed += 1
        for body in subgraphs(node):
            changed += _name_nodes(body, names, f"{node.name}/")
    return changed


#: First IR version in which an initializer need not also be a graph input.
INITIALIZERS_NOT_INPUTS_IR = 4


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with calls to its model-local functions replaced by their bodies (exporters wrap modules in functions).

    A Conv inside a function reads its weight as a function input, so without this the planner sees only the call and
    the weights stay float. onnxruntime inlines them the same way when it loads the model.
    """
    if not model.functions:
        return model
    import onnx.inliner

    for function in model.functions:  # inlined copies get the name plus "__<call>": say which function they came from
        for i, node in enumerate(function.node):
            node.name = node.name or f"{function.name}/{node.op_type}_{i}"
    inlined = onnx.inliner.inline_local_functions(model)
    logger.info("inlined %d model-local functions", len(model.functions))
    return inlined


def unlist_initializer_inputs(model: onnx.ModelProto) -> int:
    """Drop the graph-input listings of initializers where they are an exporter's habit, not a choice; return how many.

    Before IR 4 every initializer had to be listed as a graph input, and onnxruntime never lets callers override
    initializers of such models, so they are constants in effect. From IR 4 a listed initializer is a default a caller
    may override, but older exporters (torch's ``keep_initializers_as_inputs``, MXNet, keras2onnx) list every one of
    them: when all the initializers are listed, they are the model's parameters, not inputs anyone feeds, and they are
    unlisted too (onnxruntime's own advice for such models; a warning says so, as the written model then no longer takes
    them as inputs). A model that lists only some keeps them: those may be meant as inputs, and their weights stay float.
    """
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    listed = [i.name for i in graph.input if i.name in initializers]
    if not listed:
        return 0
    if model.ir_version >= INITIALIZERS_NOT_INPUTS_IR:
        if len(listed) < len(initializers):
            return 0
        logger.warning("note: all %d initializers were also listed as graph inputs (an exporter's habit); they are read as the "
                       "model's weights, and the written model no longer lists them as inputs", len(listed))
    keep = [i for i in graph.input if i.name not in initializers]
    del graph.input[:]
    graph.input.extend(keep)
    model.ir_version = max(model.ir_version, INITIALIZERS_NOT_INPUTS_IR)
    return len(listed)


#: Constant attributes other than ``value`` that hold numbers, with the element type of the tensor they stand for.
_CONSTANT_NUMBERS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a ``Constant`` node holds (a copy), or None for strings and sparse tensors."""
    value = attribute(node, "value")
    if isinstance(value, onnx.TensorProto):
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        return tensor
    for name, dtype in _CONSTANT_NUMBERS.items():
        number = attribute(node, name)
        if number is not None:
            return numpy_helper.from_array(np.asarray(number, dtype=dtype))
    return None


def lift_constants(graph: onnx.GraphProto) -> int:
    """Turn ``Constant`` nodes holding a tensor or numbers into initializers, so weights look alike whatever the exporter.

    torch's dynamo exporter writes integer constants as ``value_ints`` (the sizes a recurrent layer's weights are sliced
    by, without its optimizer); lifted, they let the paths to those weights be computed ahead.
    """
    outputs = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    lifted = 0
    for node in graph.node:
        tensor = _constant_tensor(node) if is_op(node, "Constant") else None
        if tensor is not None and node.output[0] not in outputs:
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            lifted += 1
        else:
            keep.append(node)
    if lifted:
        del graph.node[:]
        graph.node.extend(keep)
    return lifted


def hoist_body_weights(graph: onnx.GraphProto) -> int:
    """Move the weights If/Loop/Scan bodies keep (initializers or Constant nodes) to the main graph, renamed where taken.

    A body may read the values of the graphs around it, so the model computes the same; the weights then sit where
    the planner, the range search and the rewrite find weights, and get quantized like the main graph's.
    """
    counts = Counter(name for g in all_graphs(graph) for name in defined_names(g))
    names = NameSource(graph)
    return sum(_hoist(body, graph, counts, names) for node in graph.node for body in subgraphs(node))


def _hoist(body: onnx.GraphProto, main: onnx.GraphProto, counts: Counter[str], names: NameSource) -> int:
    """Hoist ``body``'s weights (inner bodies' first) into ``main``; how many moved."""
    moved = sum(_hoist(inner, main, counts, names) for node in body.node for inner in subgraphs(node))
    lift_constants(body)
    own = {t.name: t for t in body.initializer}
    pinned = {i.name for i in body.input} | {o.name for o in body.output}
    weights = {name for name in _read_as_weights(body.node) if name in own and name not in pinned and own[name].data_type in FLOAT_TYPES}
    keep = [t for t in body.initializer if t.name not in weights]
    for name in sorted(weights):
        tensor = main.initializer.add()
        tensor.CopyFrom(own[name])
        if counts[name] > 1:  # defined elsewhere too: the hoisted copy gets a name of its own
            tensor.name = names.fresh(name)
            rename_input(body, name, tensor.name)
    if weights:
        del body.initializer[:]
        body.initializer.extend(keep)
    return moved + len(weights)


def _weight_candidates(node: onnx.NodeProto) -> list[str]:
    """Inputs of a weighted node that may hold its weight: a recurrent layer's W and R, otherwise the first two."""
    indices = RECURRENT_WEIGHTS.get(node.op_type, (0, 1))
    return [node.input[i] for i in indices if i < len(node.input)]


def _read_as_weights(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """The names that weighted nodes (of the standard domain) among ``nodes`` read where a weight may be."""
    return {name for node in nodes if node.op_type in HANDLERS and is_default_domain(node.domain) for name in _weight_candidates(node)}


def merge_identical_weights(graph: onnx.GraphProto) -> int:
    """Let every reader of a weight equal, value for value, to an earlier one read that one; how many were merged.

    Folding a body's constant paths can make copies: Silero VAD's LSTM weights are reordered by Slice/Concat of one
    constant in each branch of an inner If, and folded they are two equal constants per tensor. Merged, the model
    stores the codes once and the planner sees one weight shared by both layers (its second moments the sum over
    both readers). Only main-graph float initializers that some weighted node reads as a weight are merged, and only
    under names no body redefines, so every reader resolves the kept name to the same tensor; weights kept in external
    files are left alone (comparing them would read every weight of a large model once more). Equal means the same
    bytes (a hash) and the same values (compared; a weight holding a NaN merges with nothing).
    """
    graphs = list(all_graphs(graph))
    counts = Counter(name for g in graphs for name in defined_names(g))
    read_as_weight = _read_as_weights(node for g in graphs for node in g.node)
    pinned = {i.name for i in graph.input} | {o.name for o in graph.output}
    candidates = [t for t in graph.initializer if t.name in read_as_weight and t.name not in pinned and counts[t.name] == 1
                  and t.data_type in FLOAT_TYPES and not is_external(t)]
    shapes = Counter((t.data_type, tuple(t.dims)) for t in candidates)
    first: dict[tuple[int, tuple[int, ...], bytes], list[onnx.TensorProto]] = {}
    merged: dict[str, str] = {}
    for tensor in candidates:
        if shapes[(tensor.data_type, tuple(tensor.dims))] < 2:
            continue
        values = to_array(tensor)
        key = (tensor.data_type, tuple(tensor.dims), hashlib.blake2b(values.tobytes(), digest_size=16).digest())
        twin = next((t for t in first.get(key, []) if np.array_equal(to_array(t), values)), None)
        if twin is not None:
            merged[tensor.name] = twin.name
        else:
            first.setdefault(key, []).append(tensor)
    for old, new in merged.items():
        rename_input(graph, old, new)
    if merged:
        remove_unused_initializers(graph)
    return len(merged)


def bypass_constant_identities(graph: onnx.GraphProto) -> int:
    """Let readers of ``Identity(initializer)`` read the initializer itself, so such weights count as constants."""
    consts = constant_initializers(graph)
    outputs = {o.name for o in graph.output}
    alias = {
        node.output[0]: node.input[0]
        for node in graph.node
        if is_op(node, "Identity") and node.input[0] in consts and node.output[0] not in outputs
    }
    if not alias:
        return 0
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)
    return len(alias)


#: Ops computed ahead of time when every input is a constant: what exporters leave on a weight's path (the
#: TorchScript exporter without constant folding writes MatMul(x, Transpose(W)); float16 weights come through a
#: Cast; reshapes and scalings; a torch LSTM's gates reordered into ONNX's by Slice and Concat). None of them makes
#: more data than it reads, so folding never grows the model.
FOLDABLE_OPS = frozenset(
    {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "Neg", "Abs", "Sqrt", "Reciprocal", "Mul", "Div", "Add", "Sub",
     "Slice", "Concat"}
)


def fold_constant_paths(graph: onnx.GraphProto, opset: int, outer: Mapping[str, onnx.TensorProto] | None = None) -> int:
    """Replace nodes of FOLDABLE_OPS whose inputs are all constants by initializers holding their outputs.

    Without this a weight behind such a node is "computed" and stays float. The values come from onnx's reference
    implementation of the op at the model's opset; nodes producing graph outputs, ops whose result would be larger
    than their largest input (broadcasting; a Concat, than all its inputs together), and Casts of integer codes (a
    quantized weight) stay. ``outer``: constants of the graphs around a control-flow body, which it may read.
    """
    consts = _visible_constants(graph, outer or {})
    outputs = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    folded = 0
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if (
            not is_op(node, *FOLDABLE_OPS)
            or not inputs
            or not all(name in consts for name in inputs)
            or any(out in outputs for out in node.output)
            or (is_op(node, "Cast") and consts[inputs[0]].data_type in CODE_TYPES)  # decodes quantized codes
        ):
            keep.append(node)
            continue
        values = [to_array(consts[name]) for name in inputs]
        results = _evaluate(node, opset, dict(zip(inputs, values, strict=True)))
        largest = sum(v.size for v in values) if is_op(node, "Concat") else max(v.size for v in values)
        if max(np.asarray(r).size for r in results) > largest:
            keep.append(node)
            continue
        for name, value in zip(node.output, results, strict=True):
            consts[name] = numpy_helper.from_array(np.asarray(value), name)
            graph.initializer.append(consts[name])
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        remove_unused_initializers(graph)
    return folded


def _evaluate(node: onnx.NodeProto, opset: int, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``node``'s outputs on ``feeds`` by onnx's reference implementation.

    Imported here, when a node is folded: onnx.reference (all its op modules) takes 6-10 MB, counted in every run's
    peak though most models have nothing to fold (CREPE's run: 13.3 -> 7 MB resident after preparing, one-off).
    """
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)


def fold_body_constant_paths(graph: onnx.GraphProto, opset: int) -> int:
    """:func:`fold_constant_paths` inside every control-flow body (after its Constant nodes are lifted), outer constants visible.

    Exporters write a recurrent layer's weights in a body as slices of one constant, reordered (torch's LSTM gates
    i, f, g, o become ONNX's i, o, f, c): folded, they are constants the hoisting below moves and the planner quantizes.
    """
    folded = _fold_bodies(graph, opset, constant_initializers(graph))
    if folded:  # a body's folded weight may have been the last reader of a constant held by a graph around it
        for g in all_graphs(graph):
            remove_unused_initializers(g)
    return folded


def _fold_bodies(graph: onnx.GraphProto, opset: int, visible: Mapping[str, onnx.TensorProto]) -> int:
    folded = 0
    for node in graph.node:
        for body in subgraphs(node):
            lift_constants(body)
            folded += fold_constant_paths(body, opset, visible)
            folded += _fold_bodies(body, opset, _visible_constants(body, visible))
    return folded


def _visible_constants(graph: onnx.GraphProto, outer: Mapping[str, onnx.TensorProto]) -> dict[str, onnx.TensorProto]:
    """The constants ``graph`` can read: its own, and those of the graphs around it (``outer``) it does not hide."""
    own = defined_names(graph)
    return {name: t for name, t in outer.items() if name not in own} | constant_initializers(graph)


def fold_batch_norms(graph: onnx.GraphProto) -> int:
    """Fold inference-mode BatchNormalization into the Conv before it (weights and bias rescaled)."""
    consts = constant_initializers(graph)
    readers = consumers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    names = NameSource(graph)
    folded: set[int] = set()
    for bn in graph.node:
        if not is_op(bn, "BatchNormalization"):
            continue
        conv = producer.get(bn.input[0])
        if conv is None or not _foldable(conv, bn, consts, readers, outputs):
            continue
        if _fold_one(graph, conv, bn, consts, names):
            folded.add(id(bn))
    if folded:
        keep = [n for n in graph.node if id(n) not in folded]
        del graph.node[:]
        graph.node.extend(keep)
        remove_unused_initializers(graph)
    return len(folded)


def _foldable(
    conv: onnx.NodeProto,
    bn: onnx.NodeProto,
    consts: dict[str, onnx.TensorProto],
    readers: dict[str, list[onnx.NodeProto]],
    outputs: set[str],
) -> bool:
    """Whether ``bn`` can be folded into ``conv`` without changing anything else in the graph."""
    if not is_op(conv, "Conv"):
        return False
    if attribute(bn, "training_mode", 0) or any(bn.output[1:]):
        return False
    if conv.output[0] in outputs or len(readers.get(conv.output[0], [])) != 1:
        return False
    if len(bn.input) < 5 or not all(name in consts for name in bn.input[1:5]):
        return False
    own = [conv.input[1]] + ([conv.input[2]] if len(conv.input) > 2 and conv.input[2] else [])
    if not all(name in consts and len(readers.get(name, [])) == 1 for name in own):
        return False
    return consts[conv.input[1]].data_type == onnx.TensorProto.FLOAT


def _fold_one(
    graph: onnx.GraphProto,
    conv: onnx.NodeProto,
    bn: onnx.NodeProto,
    consts: dict[str, onnx.TensorProto],
    names: NameSource,
) -> bool:
    """Fold ``bn`` into ``conv``; False (and nothing changed) when its parameters do not fit or give non-finite values."""
    weight_tensor = consts[conv.input[1]]
    has_bias = len(conv.input) > 2 and bool(conv.input[2])
    with np.errstate(all="ignore"):  # a negative variance or NaN parameter is refused below, not warned about
        gamma, beta, mean, var = (to_array(consts[n]).astype(np.float64) for n in bn.input[1:5])
        weight = to_array(weight_tensor).astype(np.float64)
        bias = to_array(consts[conv.input[2]]).astype(np.float64) if has_bias else np.zeros(weight.shape[:1])
        if any(p.shape != weight.shape[:1] for p in (gamma, beta, mean, var, bias)):
            return False
        eps = float(attribute(bn, "epsilon", 1e-5))
        factor = gamma / np.sqrt(var + eps)
        new_weight = (weight * factor.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(np.float32)
        new_bias = ((bias - mean) * factor + beta).astype(np.float32)
    if not (np.isfinite(new_weight).all() and np.isfinite(new_bias).all()):
        return False
    weight_tensor.CopyFrom(numpy_helper.from_array(new_weight, weight_tensor.name))
    if has_bias:
        consts[conv.input[2]].CopyFrom(numpy_helper.from_array(new_bias, conv.input[2]))
    else:
        bias_name = names.fresh(f"{conv.name or conv.output[0]}_folded_bias")
        graph.initializer.append(numpy_helper.from_array(new_bias, bias_name))
        if len(conv.input) > 2:
            conv.input[2] = bias_name
        else:
            conv.input.append(bias_name)
    conv.output[0] = bn.output[0]
    return True


def fold_static_shapes(model: onnx.ModelProto) -> int:
    """Replace main-graph ``Shape`` nodes by initializers where inference knows every dimension they read; how many.

    torch's dynamo exporter without its optimizer slices a recurrent layer's weights at multiples of the hidden size,
    which it reads as Shape(initial state)[2]: folded, the slices are constant paths and the weights get quantized.
    onnxruntime folds such Shapes the same way when it loads a model, so the model computes the same. Runs shape
    inference only where the main graph has a Shape node.
    """
    graph = model.graph
    if not any(is_op(node, "Shape") for node in graph.node):
        return 0
    infer_shapes(model)
    shapes = {info.name: info.type.tensor_type.shape for info in [*graph.input, *graph.value_info, *graph.output]
              if info.type.tensor_type.HasField("shape")}
    consts = constant_initializers(graph)
    outputs = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in graph.node:
        value = _static_shape(node, shapes, consts) if is_op(node, "Shape") and node.output[0] not in outputs else None
        if value is None:
            keep.append(node)
        else:
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
    folded = len(graph.node) - len(keep)
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
    return folded


def _static_shape(node: onnx.NodeProto, shapes: Mapping[str, onnx.TensorShapeProto], consts: Mapping[str, onnx.TensorProto]) -> np.ndarray | None:
    """What a Shape node computes (its ``start``/``end`` applied), or None where a dimension it reads is not known."""
    name = node.input[0]
    if name in consts:
        dims: list[int | None] = list(consts[name].dims)
    elif name in shapes:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in shapes[name].dim]
    else:
        return None
    rank = len(dims)
    start, end = (int(attribute(node, key, default)) for key, default in (("start", 0), ("end", rank)))
    start, end = (min(max(i + rank if i < 0 else i, 0), rank) for i in (start, end))
    read = dims[start:end]
    return None if any(d is None for d in read) else np.array(read, dtype=np.int64)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Model with inferred value_info where onnx can infer it; unchanged if inference fails.

    Inference runs on a skeleton without big weights' values (it copies the model), so models of any size get shapes.
    """
    try:
        on_skeleton(model, onnx.shape_inference.infer_shapes)
        return model
    except Exception as e:  # inference is a convenience, never a reason to stop
        logger.info("shape inference skipped: %s", e)
        return model


def prepare(model: onnx.ModelProto, fresh: bool = False) -> onnx.ModelProto:
    """Run the preparation passes in order and return the prepared model (``model`` itself, prepared in place).

    ``fresh``: where a pass replaced tensors, a fresh copy instead, so that their memory goes (with upb it stays in the
    message tree until the whole model goes: orientation's folded BatchNorms, 10 MB); ``model`` is then left part-prepared.
    """
    model = inline_functions(model)
    graph = model.graph
    unlist_initializer_inputs(model)
    name_nodes(graph)
    lifted = lift_constants(graph)
    opset = default_opset(model)
    computed = fold_body_constant_paths(graph, opset) if opset is not None else 0
    hoisted = hoist_body_weights(graph)
    bypass_constant_identities(graph)
    computed += fold_constant_paths(graph, opset) if opset is not None else 0
    if opset is not None and fold_static_shapes(model):
        computed += fold_constant_paths(graph, opset)
    gemms = gemm_weight_first_to_matmul(graph)
    fused = fused_matmuls_to_matmul(graph)
    unfused = fused_ops_to_standard(graph)
    merged = merge_identical_weights(graph)
    folded = fold_batch_norms(graph)
    logger.info(
        "prepared: %d Constant nodes lifted, %d body weights moved to the main graph, %d constant nodes computed, "
        "%d Gemm with the weight first and %d FusedMatMul made MatMul, %d FusedConv/FusedGemm made Conv/Gemm and activation, "
        "%d equal weights merged, %d BatchNormalization folded",
        lifted, hoisted, computed, gemms, fused, unfused, merged, folded,
    )
    if fresh and any((lifted, hoisted, computed, gemms, fused, unfused, merged, folded)):
        model = compact(model)
    return infer_shapes(model)
