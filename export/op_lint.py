"""Op lint: name every node whose gradient ONNX Runtime 1.19.2 cannot build, before ORT tries.

What it is: a static check of a forward ONNX graph, run before `generate_artifacts`. It picks the nodes
that need a gradient the way ORT's GradientGraphBuilder does (orttraining/core/framework/
gradient_graph_builder.cc): nodes reached backwards from the loss through float tensors and forwards
from a trainable parameter, both skipping ORT's stop-gradient edges. It checks those nodes against the
gradient builders registered in ORT 1.19.2, plus a few builder limits and one crash measured on 1.19.2.

What it is not: a proof that generate_artifacts will succeed. It does not run the graph optimizations
that ORT runs first, and it does not check shapes or kernels. If onnx shape inference cannot tell a
tensor's type, the lint assumes no gradient flows through that tensor. That can miss a problem (ORT
still fails, just less clearly), but it is much less likely to block a graph that ORT can train.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import onnx
from onnx import TensorProto

# ORT's GRAD_ALLOWED_TYPES: only tensors of these element types carry a gradient; ORT stops at the others.
_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})

# Op types with a registered gradient builder in onnxruntime-training 1.19.2. Source: microsoft/onnxruntime
# orttraining/orttraining/core/graph/gradient_builder_registry.cc. The stored copy we could read is an older
# revision (commit 02d27e275e1f, version-ranged REGISTER_GRADIENT_BUILDER), not tag v1.19.2, so it was
# completed with the builder classes compiled into the 1.19.2 wheel (GenericRegistry::Register<Get*Gradient>
# strings in onnxruntime_pybind11_state.so). Every ai.onnx entry was checked with generate_artifacts on 1.19.2.
# ORT looks builders up by op type alone (it ignores the domain), so this set holds op types.
SUPPORTED_GRADIENT_OPS = frozenset((
    # ai.onnx
    "Abs Add AveragePool BatchNormalization Cast Clip Concat Conv ConvTranspose Cos Div Dropout Erf Exp Expand "
    "Flatten Gather GatherElements GatherND Gelu Gemm GlobalAveragePool Identity LayerNormalization LeakyRelu Log "
    "LogSoftmax MatMul Max MaxPool Min Mul Neg Pad Pow Reciprocal ReduceL2 ReduceLogSumExp ReduceMean ReduceSum "
    "Relu Reshape Resize ScatterElements ScatterND Sigmoid Sin Slice Softmax SoftmaxCrossEntropyLoss Split Sqrt "
    "Squeeze Sub Tanh Tile TopK Transpose Trilu Unsqueeze Where "
    # com.microsoft and ORT-internal training ops (ORT rewrites BatchNormalization to BatchNormInternal)
    "BatchNormInternal BiasGelu ConcatTraining FakeQuant FastGelu FlattenAndUnpad GRUTraining LSTMTraining "
    "MatMulBnb4 MegatronF MegatronG PadAndUnflatten PythonOp QuickGelu Recv ScaledSum Send ShrunkenGather "
    "SimplifiedLayerNormalization SoftmaxCrossEntropy SoftmaxCrossEntropyLossInternal SparseSoftmaxCrossEntropy"
).split())
# Left out (measured "The gradient builder has not been registered"): Einsum, CumSum, CastLike, ReduceMax/Min/
# Prod/L1/SumSquare/LogSum, Sum, Mean, Floor, Ceil, Round, Sign, Softplus, Elu, InstanceNormalization,
# GlobalMaxPool, DepthToSpace, If/Loop/Scan. ATen too: its gradients exist only once ORTModule registers them.

# ORT's STOP_GRADIENT_EDGES (orttraining/core/framework/gradient_graph_builder.h, newest stored revision; the Pow,
# Clip and Range entries were checked on 1.19.2): float inputs that ORT never differentiates. Integer and bool
# inputs need no entry, because their type already stops the gradient.
_STOP_GRADIENT_EDGES = {
    "Not": {0}, "And": {0, 1}, "Or": {0, 1}, "Xor": {0, 1}, "Equal": {0, 1}, "Less": {0, 1}, "LessOrEqual": {0, 1},
    "Greater": {0, 1}, "GreaterOrEqual": {0, 1}, "IsInf": {0}, "IsNaN": {0}, "NonZero": {0}, "Shape": {0},
    "Size": {0}, "Pow": {1}, "Gather": {1}, "GatherElements": {1}, "GatherND": {1}, "Reshape": {1}, "Expand": {1},
    "Dropout": {1, 2}, "Slice": {1, 2, 3, 4}, "SparseSoftmaxCrossEntropy": {1, 2}, "SoftmaxCrossEntropyLoss": {1, 2},
    "SoftmaxCrossEntropyLossInternal": {1, 2, 3}, "ConstantOfShape": {0}, "Scatter": {1}, "ScatterElements": {1},
    "ScatterND": {1}, "OneHot": {0, 1, 2}, "Where": {0}, "Range": {0, 1, 2}, "Tile": {1}, "TopK": {1},
    "Squeeze": {1}, "Unsqueeze": {1}, "ReduceSum": {1}, "Split": {1}, "Clip": {1, 2}, "BatchNormalization": {3, 4},
    "BatchNormInternal": {3, 4},
}

# A registered builder that still crashes on single-output nodes, because it reads the optional outputs
# (measured on 1.19.2: "GradientBuilderBase::O ... was false"). SoftmaxCrossEntropyLoss has the same limit,
# but it is not listed: ORT's optimizer adds the log_prob output itself whenever another rewrite changed the
# graph in the same pass (measured: the real fftmoe export trains). Flagging it would block graphs that work.
_REQUIRED_OUTPUTS = {"LayerNormalization": 3}

_CRASH = ("ORT 1.19.2 aborts the whole process (a C++ assertion, not an exception) when a node whose subgraphs "
          "read tensors made by other nodes lies upstream of the loss")
HINT = ("Fix: rewrite that op in the PyTorch model (e.g. einsum -> matmul, cumsum -> matmul with a triangular "
        "matrix, amax -> topk values) or add a fix-up in export/graph_fixups.py.")


@dataclass(frozen=True)
class UngradableNode:
    name: str  # node name, or a stand-in naming its first output when the node has no name
    op_type: str
    domain: str  # "" is ai.onnx
    param: str  # one trainable parameter upstream of the node ("" for frozen control flow, see _CRASH)
    reason: str = "ORT 1.19.2 has no gradient builder for this op"


class UnsupportedGradientError(ValueError):
    """The graph has nodes on the gradient path whose gradient ORT 1.19.2 cannot build."""


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes: ORT's implicit inputs of If/Loop/Scan."""
    local = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    local.update(out for node in graph.node for out in node.output)
    return {name for node in graph.node for name, _ in _node_inputs(node)} - local - {""}


def _node_inputs(node: onnx.NodeProto) -> list[tuple[str, int | None]]:
    """(tensor, input slot) pairs; implicit subgraph inputs have slot None (they are never stop edges)."""
    pairs: list[tuple[str, int | None]] = [(n, i) for i, n in enumerate(node.input) if n]
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            pairs.extend((n, None) for n in sorted(_outer_names(sub)))
    return pairs


def _is_stop_edge(node: onnx.NodeProto, slot: int | None) -> bool:
    if slot is None:
        return False
    if node.op_type == "Cast":  # ORT stops at a Cast to a non-float type (e.g. to bool)
        return next((a.i for a in node.attribute if a.name == "to"), 0) not in _FLOAT_TYPES
    return slot in _STOP_GRADIENT_EDGES.get(node.op_type, ())


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # e.g. a >2 GB proto: keep the declared types (unknown ones carry no gradient)
        inferred = model
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def _closure(start: Iterable[int], step: Callable[[int], Iterable[int]]) -> set[int]:
    seen = set(start)
    todo = deque(seen)
    while todo:
        for j in step(todo.popleft()):
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return seen


def _why_ungradable(node: onnx.NodeProto, grad_args: set[str]) -> str | None:
    if node.op_type not in SUPPORTED_GRADIENT_OPS:
        return UngradableNode.reason
    if len(node.output) < _REQUIRED_OUTPUTS.get(node.op_type, 0):
        return (f"ORT's {node.op_type} gradient needs the node's optional outputs "
                f"({_REQUIRED_OUTPUTS[node.op_type]} in all), and this node has {len(node.output)}")
    if node.op_type == "Transpose" and not any(a.name == "perm" for a in node.attribute):
        return "ORT's Transpose gradient needs an explicit perm attribute"
    if node.op_type == "Pow" and len(node.input) > 1 and node.input[1] in grad_args:
        return "ORT's Pow gradient cannot differentiate the exponent"
    return None


def find_ungradable_nodes(model: onnx.ModelProto, trainable: Iterable[str], loss_output: str) -> list[UngradableNode]:
    """Nodes on a gradient path (trainable -> loss) whose gradient ORT 1.19.2 cannot build, in graph order."""
    graph, params = model.graph, list(dict.fromkeys(trainable))
    nodes = list(graph.node)
    known = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    if missing := [p for p in params if p not in known]:
        raise ValueError(f"trainable names that are neither graph initializers nor inputs: {missing}")
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    if loss_output not in producer:
        if loss_output in known:
            return []  # the loss is a graph input: no node lies between a parameter and it
        raise ValueError(f"loss output {loss_output!r} is not produced by any node of the graph")
    inputs = [_node_inputs(node) for node in nodes]
    consumers: dict[str, list[tuple[int, int | None]]] = defaultdict(list)
    for i, pairs in enumerate(inputs):
        for name, slot in pairs:
            consumers[name].append((i, slot))
    types = _elem_types(model)
    is_float = lambda name: types.get(name) in _FLOAT_TYPES  # noqa: E731

    # 1. ORT builds nothing for a loss that no parameter reaches through non-stop edges (types ignored here).
    forward = _closure((i for p in params for i, s in consumers[p] if not _is_stop_edge(nodes[i], s)),
                       lambda i: [j for out in nodes[i].output for j, s in consumers.get(out, ())
                                  if not _is_stop_edge(nodes[j], s)])
    loss_node = producer[loss_output]
    if loss_node not in forward or not is_float(loss_output):
        return []
    # 2. Nodes upstream of the loss through float tensors and non-stop edges.
    reach = _closure([loss_node], lambda i: [producer[n] for n, s in inputs[i]
                                             if n in producer and is_float(n) and not _is_stop_edge(nodes[i], s)])
    # 3. Like ORT: start at the parameters' consumers that reach the loss, walk forward inside `reach`.
    #    `origin` keeps one parameter per node for the message; `grad_args` are the tensors given a gradient.
    origin = {i: p for p in reversed(params) for i, _ in consumers[p] if i in reach}  # first param wins
    grad_args, todo = set(params), deque(origin)
    while todo:
        i = todo.popleft()
        for out in filter(is_float, nodes[i].output):
            for j, slot in consumers.get(out, ()):
                if j in reach and not _is_stop_edge(nodes[j], slot):
                    grad_args.add(out)
                    if j not in origin:
                        origin[j] = origin[i]
                        todo.append(j)
    # A node whose subgraphs read tensors made by other nodes crashes ORT once it is upstream of the loss,
    # trainable or not: ORT's reverse walk indexes InputDefs() with an implicit-input edge (measured abort).
    crashers = {i for i in reach if any(slot is None and name in producer for name, slot in inputs[i])}
    findings = []
    for i in sorted(origin.keys() | crashers):
        node = nodes[i]
        if reason := _CRASH if i in crashers else _why_ungradable(node, grad_args):
            name = node.name or f"<unnamed, output {node.output[0]!r}>"
            findings.append(UngradableNode(name, node.op_type, node.domain, origin.get(i, ""), reason))
    return findings


def check_gradients(model: onnx.ModelProto, trainable: Iterable[str], loss_output: str) -> None:
    """Raise UnsupportedGradientError naming every node on the gradient path that ORT 1.19.2 cannot handle."""
    findings = find_ungradable_nodes(model, trainable, loss_output)
    if findings:
        lines = [f"node '{f.name}' ({f.op_type}) "
                 + (f"on the path from '{f.param}' to '{loss_output}'" if f.param else f"upstream of '{loss_output}'")
                 + f": {f.reason}" for f in findings]
        raise UnsupportedGradientError(f"ONNX Runtime 1.19.2 cannot build the gradient of {len(findings)} node(s):\n  "
                                       + "\n  ".join(lines) + "\n" + HINT)
