"""The one ONNX graph index every rewrite and check uses: lookups on small hand-built graphs (no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cxr_edge.errors import MissingExtraError  # noqa: E402
from cxr_edge.onnx_graph import GraphIndex, all_nodes, attr, drop_unused_initializers  # noqa: E402


def _model():
    """x -> Mul(x, x) -> Add(k) -> {Relu -> y, Sigmoid -> z}; ``c`` a Constant node, ``unused`` a stray constant."""
    inits = [numpy_helper.from_array(np.array([1.0, -2.0], np.float32), "k"),
             numpy_helper.from_array(np.array(7, np.int32), "unused"),
             numpy_helper.from_array(np.array(3, np.int64), "y_const")]
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array([4, 5], np.int8)), name="const"),
             helper.make_node("Mul", ["x", "x"], ["sq"], name="square"),
             helper.make_node("Add", ["sq", "k"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y"], name="act"),
             helper.make_node("Sigmoid", ["s"], ["z"], name="act"),  # a repeated name
             helper.make_node("Identity", ["c"], ["ci"]),  # unnamed
             helper.make_node("Clip", ["s", "", "k"], ["clipped"], name="clip")]  # an absent optional input
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z", "sq")]
                              + [helper.make_tensor_value_info("y_const", TensorProto.INT64, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_attr_decodes_the_value_or_gives_the_default():
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=2, auto_pad="NOTSET", alpha=0.5)
    assert attr(node, "pads") == [1, 1, 1, 1] and attr(node, "group") == 2 and attr(node, "alpha") == 0.5
    assert attr(node, "auto_pad") == b"NOTSET"  # strings come back as bytes, as onnx.helper decodes them
    assert attr(node, "strides") is None and attr(node, "strides", [1, 1]) == [1, 1]


def test_producers_and_consumers():
    G = GraphIndex(_model())
    assert G.producer("s").name == "add" and G.producer("x") is None and G.producer("k") is None
    assert [n.op_type for n in G.consumers("s")] == ["Relu", "Sigmoid", "Clip"]  # graph order
    assert [n.name for n in G.consumers("x")] == ["square"]  # Mul(x, x) reads x twice: one consumer
    assert G.consumers("nothing") == [] and G.consumers("") == []  # "" is an absent optional input, not a tensor
    assert G.only_consumer("x").name == "square"
    assert G.only_consumer("s") is None  # three readers
    assert G.only_consumer("sq") is None  # read by one node but also a graph output
    assert G.only_consumer("y") is None  # nobody reads it
    G.consumers("s").clear()  # a copy: callers cannot corrupt the index
    assert len(G.consumers("s")) == 3


def test_nodes_by_name_take_the_first_of_a_repeated_name():
    G = GraphIndex(_model())
    assert G.node("act").op_type == "Relu" and G.node("const").op_type == "Constant"
    assert G.node("") is None and G.node("missing") is None


def test_constants_from_initializers_and_constant_nodes():
    G = GraphIndex(_model())
    np.testing.assert_array_equal(G.array("k"), [1.0, -2.0])
    c = G.array("c")
    assert c.dtype == np.int8 and c.tolist() == [4, 5]
    assert G.array("s") is None and G.array("x") is None
    assert G.is_constant("k") and G.is_constant("c") and not G.is_constant("s")
    assert G.elem_type("unused") == TensorProto.INT32 and G.elem_type("c") == TensorProto.INT8
    assert G.elem_type("x") is None
    assert set(G.arrays()) == {"k", "unused", "y_const", "c"}


def test_a_graph_proto_is_indexed_as_well_as_a_model():
    model = _model()
    from_graph, from_model = GraphIndex(model.graph), GraphIndex(model)
    assert from_graph.model is None and from_model.model is model
    assert from_graph.graph.name == from_model.graph.name == "g"
    assert from_graph.producer("s").name == from_model.producer("s").name == "add"
    assert from_model.outputs == {"y", "z", "sq", "y_const"}


def test_edits_and_refresh():
    model = _model()
    G = GraphIndex(model)
    name = G.add_initializer("k2", np.array([3.0, 3.0], np.float32))
    assert name == "k2" and G.is_constant("k2") and G.array("k2").tolist() == [3.0, 3.0]  # no refresh needed
    assert model.graph.initializer[-1].name == "k2"
    add = G.producer("s")
    add.input[1] = "k2"
    G.remove_nodes([G.node("clip")])
    assert "Clip" not in [n.op_type for n in model.graph.node]
    assert [n.name for n in G.consumers("k")] == ["add", "clip"]  # a snapshot until refreshed
    G.refresh()
    assert G.consumers("k") == [] and [n.name for n in G.consumers("k2")] == ["add"]
    assert [n.op_type for n in G.consumers("s")] == ["Relu", "Sigmoid"]


def test_drop_unused_initializers_keeps_what_is_read_or_output():
    model = _model()
    model.graph.node.remove(next(n for n in model.graph.node if n.op_type == "Identity"))  # "c" is now unused
    drop_unused_initializers(model.graph)
    assert [i.name for i in model.graph.initializer] == ["k", "y_const"]  # y_const is a graph output
    assert "Constant" in [n.op_type for n in model.graph.node]  # Constant nodes only when asked
    drop_unused_initializers(model.graph, constant_nodes=True)
    assert "Constant" not in [n.op_type for n in model.graph.node]


def test_all_nodes_reach_subgraphs_and_local_functions():
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t"], name="in_then")], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="in_else")], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    body = helper.make_graph([helper.make_node("Abs", ["x"], ["a"], name="in_loop")], "body", [], [])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="if"),
             helper.make_node("Fake", ["x"], ["w"], branches=[body], name="graphs_attr"),
             helper.make_node("local_fn", ["x"], ["v"], domain="local", name="call")]
    fn = helper.make_function("local", "local_fn", ["x"], ["v"], [helper.make_node("Relu", ["x"], ["v"], name="in_fn")],
                              [helper.make_opsetid("", 17)])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 17)])
    # each node, then its subgraphs in attribute order (onnx.helper sorts attributes by name), then functions
    assert [n.name for n in all_nodes(model)] == ["if", "in_else", "in_then", "graphs_attr", "in_loop", "call", "in_fn"]


def test_a_missing_onnx_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx.numpy_helper", None)  # as if onnx were not installed
    with pytest.raises(MissingExtraError, match="onnx"):
        GraphIndex(_model())
