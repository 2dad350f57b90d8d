"""Tests for export/op_lint.py: tiny hand-built graphs, one torch export, and ORT 1.19.2 itself as referee."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from export.op_lint import (SUPPORTED_GRADIENT_OPS, UngradableNode, UnsupportedGradientError, check_gradients,
                            find_ungradable_nodes)


def const(name, value, dtype=np.float32):
    return nh.from_array(np.asarray(value, dtype=dtype), name)


W = const("W", np.random.default_rng(0).normal(size=(4, 4)))  # trainable
F = const("F", np.random.default_rng(1).normal(size=(4, 4)))  # frozen


def model(nodes, inits=(), outputs=("loss",), inputs=(("X", T.FLOAT, [2, 4]),)):
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                         [h.make_tensor_value_info(o, T.FLOAT, []) for o in outputs], [W, F, *inits])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)  # ORT 1.19.2 loads IR <= 10


def loss_of(tensor):
    return h.make_node("ReduceMean", [tensor], ["loss"], keepdims=0, name="loss_mean")


def clean_graph():
    return model([h.make_node("MatMul", ["X", "W"], ["h"], name="mm"),
                  h.make_node("Softmax", ["h"], ["p"], name="softmax"), loss_of("p")])


def einsum_on_path():
    return model([h.make_node("MatMul", ["X", "W"], ["h"], name="mm"),
                  h.make_node("Einsum", ["h", "F"], ["e"], equation="ij,jk->ik", name="the_einsum"), loss_of("e")])


def einsum_frozen():
    # The Einsum feeds the loss, but only frozen tensors flow into it: ORT builds no gradient for it.
    return model([h.make_node("Einsum", ["X", "F"], ["e"], equation="ij,jk->ik", name="frozen_einsum"),
                  h.make_node("MatMul", ["X", "W"], ["h"], name="mm"),
                  h.make_node("Mul", ["e", "h"], ["m"], name="mul"), loss_of("m")])


def reducemax_side_output():
    return model([h.make_node("MatMul", ["X", "W"], ["h"], name="mm"), loss_of("h"),
                  h.make_node("ReduceMax", ["h"], ["mx"], keepdims=0, name="side_max")], outputs=("loss", "mx"))


def cumsum_on_path(then_einsum=False):
    nodes = [h.make_node("MatMul", ["X", "W"], ["h"], name="mm"),
             h.make_node("CumSum", ["h", "axis"], ["c"], name="the_cumsum")]
    if then_einsum:
        nodes.append(h.make_node("Einsum", ["c"], ["c2"], equation="ij->ji", name="the_einsum"))
    return model([*nodes, loss_of(nodes[-1].output[0])], [const("axis", 1, np.int64)])


def integer_edges():
    # Shape -> Gather -> Concat -> Reshape's shape input, an integer CumSum, ArgMax -> Cast and a comparison:
    # all hang off the trainable path, but only through integer/bool tensors, so none needs a gradient.
    return model([
        h.make_node("MatMul", ["X", "W"], ["h"], name="mm"),
        h.make_node("Shape", ["h"], ["shape"], name="shape"),
        h.make_node("Gather", ["shape", "zero"], ["d0"], axis=0, name="gather_dim"),
        h.make_node("Concat", ["d0", "minus1"], ["new_shape"], axis=0, name="concat_shape"),
        h.make_node("Reshape", ["h", "new_shape"], ["r"], name="reshape"),
        h.make_node("CumSum", ["shape", "axis0"], ["int_cumsum"], name="int_cumsum"),
        h.make_node("Cast", ["int_cumsum"], ["cf"], to=T.FLOAT, name="cast_cumsum"),
        h.make_node("ArgMax", ["h"], ["am"], axis=1, name="argmax"),
        h.make_node("Cast", ["am"], ["amf"], to=T.FLOAT, name="cast_argmax"),
        h.make_node("GreaterOrEqual", ["h", "half"], ["ge"], name="ge"),
        h.make_node("Cast", ["ge"], ["gef"], to=T.FLOAT, name="cast_ge"),
        h.make_node("Mul", ["r", "amf"], ["q1"], name="mul1"),
        h.make_node("Mul", ["q1", "gef"], ["q2"], name="mul2"),
        h.make_node("ReduceSum", ["cf"], ["cs"], keepdims=0, name="sum_shape"),
        h.make_node("Mul", ["q2", "cs"], ["q3"], name="mul3"), loss_of("q3"),
    ], [const("zero", [0], np.int64), const("minus1", [-1], np.int64), const("axis0", 0, np.int64),
        const("half", 0.5)])


def single_output(op):
    if op == "LayerNormalization":
        node = h.make_node(op, ["h", "scale", "bias"], ["y"], axis=-1, name="ln")
    else:
        node = h.make_node(op, ["h", "labels"], ["y"], reduction="mean", name="sce")
    return model([h.make_node("MatMul", ["X", "W"], ["h"], name="mm"), node, loss_of("y")],
                 [const("scale", np.ones(4)), const("bias", np.zeros(4)), const("labels", [1, 3], np.int64)])


def trained_exponent():
    # Pow's exponent is a stop-gradient edge, yet ORT asks the Pow builder for it when W feeds it directly.
    return model([h.make_node("MatMul", ["W", "F"], ["h"], name="mm"),
                  h.make_node("Pow", ["h", "W"], ["p"], name="pow"), loss_of("p")])


def exponent_via_edge():
    # Pow's exponent input is a stop-gradient edge: a trainable-derived exponent reached through a node is fine.
    return model([h.make_node("MatMul", ["X", "W"], ["h"], name="mm"),
                  h.make_node("Sigmoid", ["h"], ["e"], name="sigmoid"),
                  h.make_node("Pow", ["X", "e"], ["p"], name="pow"),
                  h.make_node("Mul", ["p", "h"], ["m"], name="mul"), loss_of("m")])


def if_graph(branch_input):
    # The If branches read `branch_input` from the outer scope (an implicit input in ORT's terms).
    branch = lambda op, out: h.make_graph([h.make_node(op, [branch_input], [out])], op, [],  # noqa: E731
                                          [h.make_tensor_value_info(out, T.FLOAT, [2, 4])])
    return model([h.make_node("MatMul", ["X", "W"], ["hw"], name="mm_w"),
                  h.make_node("MatMul", ["X", "F"], ["hf"], name="mm_f"),
                  h.make_node("If", ["cond"], ["y"], then_branch=branch("Identity", "t"),
                              else_branch=branch("Neg", "e"), name="the_if"),
                  h.make_node("Mul", ["y", "hw"], ["m"], name="mul"), loss_of("m")],
                 inputs=(("X", T.FLOAT, [2, 4]), ("cond", T.BOOL, [])))


def flagged(m, loss="loss", trainable=("W",)):
    return [(f.name, f.op_type) for f in find_ungradable_nodes(m, trainable, loss)]


def test_supported_list_agrees_with_measured_facts():
    for op in ("Einsum", "CumSum", "CastLike", "ReduceMax", "If", "Loop", "Scan"):
        assert op not in SUPPORTED_GRADIENT_OPS
    for op in ("MatMul", "Softmax", "TopK", "GatherElements", "ScatterElements", "ScatterND", "Where", "Cast",
               "Mul", "Gelu", "Erf", "Tanh", "Sqrt", "Pow", "Expand", "ReduceMean", "Max", "LayerNormalization",
               "SoftmaxCrossEntropyLoss"):
        assert op in SUPPORTED_GRADIENT_OPS


def test_clean_path_has_no_findings():
    assert find_ungradable_nodes(clean_graph(), ["W"], "loss") == []
    check_gradients(clean_graph(), ["W"], "loss")  # does not raise


def test_einsum_on_path_is_flagged_and_named():
    assert find_ungradable_nodes(einsum_on_path(), ["W"], "loss") == [
        UngradableNode("the_einsum", "Einsum", "", "W", "ORT 1.19.2 has no gradient builder for this op")]
    with pytest.raises(UnsupportedGradientError) as err:
        check_gradients(einsum_on_path(), ["W"], "loss")
    assert isinstance(err.value, ValueError)
    assert "node 'the_einsum' (Einsum) on the path from 'W' to 'loss'" in str(err.value)
    assert "einsum -> matmul" in str(err.value) and "export/graph_fixups.py" in str(err.value)


def test_einsum_with_only_frozen_inputs_is_not_flagged():
    assert flagged(einsum_frozen()) == []
    # The same graph with F trainable puts the Einsum on the gradient path.
    assert flagged(einsum_frozen(), trainable=("W", "F")) == [("frozen_einsum", "Einsum")]


def test_reducemax_feeding_only_a_non_loss_output_is_not_flagged():
    assert flagged(reducemax_side_output()) == []
    assert flagged(reducemax_side_output(), loss="mx") == [("side_max", "ReduceMax")]


def test_cumsum_is_flagged_and_every_bad_node_is_reported():
    assert flagged(cumsum_on_path()) == [("the_cumsum", "CumSum")]
    assert flagged(cumsum_on_path(then_einsum=True)) == [("the_cumsum", "CumSum"), ("the_einsum", "Einsum")]
    with pytest.raises(UnsupportedGradientError) as err:
        check_gradients(cumsum_on_path(then_einsum=True), ["W"], "loss")
    assert "'the_cumsum' (CumSum)" in str(err.value) and "'the_einsum' (Einsum)" in str(err.value)


def test_integer_edges_on_the_path_do_not_flag():
    assert flagged(integer_edges()) == []


def test_single_output_layernorm_is_flagged():
    [finding] = find_ungradable_nodes(single_output("LayerNormalization"), ["W"], "loss")
    assert (finding.name, finding.op_type) == ("ln", "LayerNormalization") and "optional outputs" in finding.reason
    fixed = single_output("LayerNormalization")
    fixed.graph.node[1].output.extend(["mean", "inv_std_dev"])  # what export/graph_fixups.py does
    assert flagged(fixed) == []
    # Not flagged on purpose: ORT itself often adds SoftmaxCrossEntropyLoss's log_prob output (see op_lint.py).
    assert flagged(single_output("SoftmaxCrossEntropyLoss")) == []


def test_builder_limits_for_transpose_and_pow():
    no_perm = model([h.make_node("Transpose", ["W"], ["t"], name="tr"), loss_of("t")])
    assert flagged(no_perm) == [("tr", "Transpose")]
    assert flagged(trained_exponent()) == [("pow", "Pow")]
    assert flagged(exponent_via_edge()) == []
    fixed_exponent = model([h.make_node("Pow", ["W", "two"], ["p"], name="pow"), loss_of("p")], [const("two", 2.0)])
    assert flagged(fixed_exponent) == []


def test_control_flow_upstream_of_the_loss_is_flagged():
    [on_path] = find_ungradable_nodes(if_graph("hw"), ["W"], "loss")  # W reaches the If only via its subgraphs
    assert (on_path.name, on_path.op_type, on_path.param) == ("the_if", "If", "W")
    # Frozen control flow is flagged too: ORT 1.19.2 aborts on it (see the subprocess test below).
    [frozen] = find_ungradable_nodes(if_graph("hf"), ["W"], "loss")
    assert (frozen.name, frozen.param) == ("the_if", "") and "aborts" in frozen.reason
    with pytest.raises(UnsupportedGradientError, match="node 'the_if' \\(If\\) upstream of 'loss'"):
        check_gradients(if_graph("hf"), ["W"], "loss")
    side = if_graph("hw")  # the If now feeds only a second output, not the loss
    side.graph.node[3].input[0] = "hw"
    side.graph.output.append(h.make_tensor_value_info("y", T.FLOAT, [2, 4]))
    assert flagged(side) == []


def test_unknown_names_are_rejected_clearly():
    with pytest.raises(ValueError, match="nope"):
        find_ungradable_nodes(clean_graph(), ["nope"], "loss")
    with pytest.raises(ValueError, match="missing_loss"):
        find_ungradable_nodes(clean_graph(), ["W"], "missing_loss")


def torch_model(with_cumsum: bool) -> onnx.ModelProto:
    torch = pytest.importorskip("torch")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x, target):
            y = self.lin(x)
            if with_cumsum:
                y = torch.cumsum(y, dim=-1)
            return ((y - target) ** 2).mean()

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter (dynamo=False) is deprecated, and says so
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Tiny(), (torch.randn(2, 4), torch.randn(2, 3)), buffer, dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                          input_names=["x", "target"], output_names=["loss"])
    return onnx.load_from_string(buffer.getvalue())


def test_torch_export_with_cumsum_is_found():
    exported = torch_model(with_cumsum=True)
    params = [init.name for init in exported.graph.initializer if init.name.startswith("lin.")]
    assert sorted(params) == ["lin.bias", "lin.weight"]
    [finding] = find_ungradable_nodes(exported, params, "loss")
    assert finding.op_type == "CumSum" and finding.param in params
    assert find_ungradable_nodes(torch_model(with_cumsum=False), params, "loss") == []


def ort_error(m: onnx.ModelProto, trainable, tmp_path) -> str | None:
    """None if ORT 1.19.2 builds the training artifacts (loss=None: the first graph output is the loss)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    artifacts = pytest.importorskip("onnxruntime.training.artifacts")
    onnxruntime.set_default_logger_severity(3)
    try:
        artifacts.generate_artifacts(m, requires_grad=list(trainable), loss=None, artifact_directory=tmp_path)
    except Exception as err:  # noqa: BLE001 - ORT raises plain RuntimeErrors
        return str(err)
    return None


@pytest.mark.parametrize("case", ["clean", "einsum", "einsum_frozen", "reducemax_side", "cumsum", "integer_edges",
                                  "ln_single_output", "pow_trained_exponent", "pow_exponent_via_edge",
                                  "torch_clean", "torch_cumsum"])
def test_lint_agrees_with_ort_generate_artifacts(case, tmp_path):
    m = {"clean": clean_graph, "einsum": einsum_on_path, "einsum_frozen": einsum_frozen,
         "reducemax_side": reducemax_side_output, "cumsum": cumsum_on_path, "integer_edges": integer_edges,
         "ln_single_output": lambda: single_output("LayerNormalization"), "pow_trained_exponent": trained_exponent,
         "pow_exponent_via_edge": exponent_via_edge, "torch_clean": lambda: torch_model(False),
         "torch_cumsum": lambda: torch_model(True)}[case]()
    trainable = ["lin.weight", "lin.bias"] if case.startswith("torch") else ["W"]
    findings = find_ungradable_nodes(m, trainable, m.graph.output[0].name)
    error = ort_error(m, trainable, tmp_path)
    assert bool(findings) == (error is not None), error
    for f in findings:
        if "no gradient builder" in f.reason:  # ORT names the very node the lint named
            assert "not been registered" in error and f"{f.op_type} for node {f.name}" in error
    if error is None:
        assert (tmp_path / "training_model.onnx").exists()


def test_ort_aborts_on_control_flow_the_lint_flags(tmp_path):
    """ORT dies with a C++ assertion (no Python exception), so it must run in a child process."""
    pytest.importorskip("onnxruntime.training.artifacts")
    onnx.save(if_graph("hf"), tmp_path / "if.onnx")
    script = ("import onnx, onnxruntime, sys; onnxruntime.set_default_logger_severity(3)\n"
              "from onnxruntime.training import artifacts\n"
              "artifacts.generate_artifacts(onnx.load(sys.argv[1]), requires_grad=['W'], loss=None,"
              " artifact_directory=sys.argv[2])\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "if.onnx"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and not (tmp_path / "training_model.onnx").exists()
    assert "Assertion" in done.stderr
