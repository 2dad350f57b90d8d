"""Every ONNX graph rewrite that ONNX Runtime 1.19.2 training needs, in one place, each with its reason.

Measured quirks (ORT_NOTES.md) and their fixes:
- LayerNormalization with one output crashes ORT's gradient builder
  (`GradientBuilderBase::O ... was false`): give every LN node its optional Mean and InvStdDev outputs.
- SoftmaxCrossEntropyLoss with one output crashes the gradient builder too (its gradient reads the
  optional log_prob output); ORT's optimiser sometimes adds it by itself, so add it explicitly.
- The dynamo exporter emits CastLike, which has no gradient builder: rewrite it to Cast with the
  target dtype read from the second input's type.
- `generate_artifacts` stamps files with the installed onnx's IR version (14 for onnx 1.23), which
  ORT 1.19.2 refuses ("Unsupported model IR version"): lower it to 10, which the ops used here allow.
Nothing else in the project edits graphs.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper, shape_inference

MAX_IR_VERSION = 10  # the highest IR version ORT 1.19.2 loads


def add_layernorm_stat_outputs(model: onnx.ModelProto) -> int:
    """Give each single-output LayerNormalization node named Mean and InvStdDev outputs."""
    fixed = 0
    for index, node in enumerate(model.graph.node):
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            stem = node.name or f"layernorm_{index}"
            node.output.extend([f"{stem}__mean", f"{stem}__inv_std_dev"])
            fixed += 1
    return fixed


def add_softmax_ce_log_prob_outputs(model: onnx.ModelProto) -> int:
    """Give each single-output SoftmaxCrossEntropyLoss node its optional log_prob output."""
    fixed = 0
    for index, node in enumerate(model.graph.node):
        if node.op_type == "SoftmaxCrossEntropyLoss" and len(node.output) == 1:
            node.output.append(f"{node.name or f'softmax_ce_{index}'}__log_prob")
            fixed += 1
    return fixed


def rewrite_castlike(model: onnx.ModelProto) -> int:
    """Replace CastLike(x, like) by Cast(x, to=dtype of like). Needs inferable types."""
    if not any(n.op_type == "CastLike" for n in model.graph.node):
        return 0
    inferred = shape_inference.infer_shapes(model)
    dtypes = {v.name: v.type.tensor_type.elem_type
              for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    dtypes.update({init.name: init.data_type for init in model.graph.initializer})
    rewritten = 0
    for index, node in enumerate(model.graph.node):
        if node.op_type != "CastLike":
            continue
        like = node.input[1]
        if like not in dtypes:
            raise ValueError(f"CastLike node {node.name!r}: cannot infer the dtype of {like!r}")
        cast = helper.make_node("Cast", [node.input[0]], list(node.output), name=node.name, to=dtypes[like])
        model.graph.node[index].CopyFrom(cast)
        rewritten += 1
    return rewritten


def fix_forward_graph(model: onnx.ModelProto) -> dict[str, int]:
    """Apply the forward-graph fixes before `generate_artifacts`; returns counts per fix."""
    return {"layernorm_outputs": add_layernorm_stat_outputs(model),
            "softmax_ce_outputs": add_softmax_ce_log_prob_outputs(model), "castlike": rewrite_castlike(model)}


def lower_ir_version(path: Path) -> bool:
    """Rewrite an ONNX file in place if its IR version is above what ORT 1.19.2 loads."""
    model = onnx.load(str(path), load_external_data=False)
    if model.ir_version <= MAX_IR_VERSION:
        return False
    model.ir_version = MAX_IR_VERSION
    onnx.save(model, str(path))
    return True
