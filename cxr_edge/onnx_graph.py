"""Name lookups over one ONNX graph, shared by every hand-written graph rewrite and check.

The rewrites (``export.graph_fold``, ``export.qdq_rewrites``), the checks (``export.trt_lint``,
``export.activation_signs``, ``graph_macs``) and the EP-context scan (``runtime.backends.ep_context``) all ask
the same questions of a graph: which node makes this tensor, which nodes read it, is it a constant and what is
its value, what is this attribute. :class:`GraphIndex` answers them from one scan of ``graph.node``, on onnx's
own protobuf objects, so a rewrite edits the model it was given in place and leaves every other byte as it was.

onnx-graphsurgeon (NVIDIA's graph editor, on PyPI) would give the same lookups, but it is on none of this
project's dependency lists and it edits its own copy of the graph that must be exported back to a new
``ModelProto``, where these rewrites change a few nodes of the caller's protobuf in place.

onnx is an optional extra: it is imported when first needed, through :func:`cxr_edge.extras.require`, so a
missing install says which extra to add.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .extras import require

if TYPE_CHECKING:
    from onnx import GraphProto, ModelProto, NodeProto, TensorProto

__all__ = ["GraphIndex", "all_nodes", "attr", "drop_unused_initializers"]


def attr(node: NodeProto, name: str, default: Any = None) -> Any:
    """The value of ``node``'s attribute ``name`` (as onnx.helper decodes it), or ``default`` when it is absent,
    because ONNX leaves most attributes optional with a default each op's spec gives."""
    helper = require("onnx.helper")
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _walk(nodes: Iterable[NodeProto]) -> Iterator[NodeProto]:
    """Each node, then the nodes of its control-flow subgraphs, depth first."""
    for node in nodes:
        yield node
        for a in node.attribute:
            if a.g.node:
                yield from _walk(a.g.node)
            for g in a.graphs:
                yield from _walk(g.node)


def all_nodes(model: ModelProto) -> Iterator[NodeProto]:
    """Every node of the model: the main graph, control-flow subgraphs, and model-local functions, because
    ONNX Runtime inlines functions before it runs, so a node inside one runs like any other."""
    yield from _walk(model.graph.node)
    for fn in model.functions:
        yield from _walk(fn.node)


def drop_unused_initializers(graph: GraphProto, constant_nodes: bool = False) -> None:
    """Remove initializers (and with ``constant_nodes`` also Constant nodes) that no node and no graph output
    reads, because a rewrite that bypasses a node leaves its constants behind and the checker keeps them."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    if constant_nodes:
        for n in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
            graph.node.remove(n)
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


class GraphIndex:
    """Producers, consumers, constants and node names of one graph (the model's main graph, not subgraphs).

    A snapshot: built from one scan, it answers for the graph as it was then, so a rewrite does every lookup
    it needs first and edits afterwards, or calls :meth:`refresh` after an edit to look again.
    :meth:`add_initializer` keeps the constants current itself.
    """

    def __init__(self, model_or_graph: ModelProto | GraphProto) -> None:
        onnx = require("onnx")
        self._numpy_helper = require("onnx.numpy_helper")
        self.model: ModelProto | None = model_or_graph if isinstance(model_or_graph, onnx.ModelProto) else None
        self.graph: GraphProto = self.model.graph if self.model is not None else model_or_graph
        self.initializers: dict[str, TensorProto] = {}
        self.constant_nodes: dict[str, NodeProto] = {}
        self.outputs: set[str] = set()
        self._producer: dict[str, NodeProto] = {}
        self._consumers: dict[str, list[NodeProto]] = {}
        self._by_name: dict[str, NodeProto] = {}
        self.refresh()

    def refresh(self) -> None:
        """Index the graph again, because a rewrite changed which node reads or writes which tensor."""
        g = self.graph
        self.initializers = {t.name: t for t in g.initializer}
        self.constant_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
        self.outputs = {o.name for o in g.output}
        self._producer = {o: n for n in g.node for o in n.output if o}
        self._consumers = {}
        self._by_name = {}
        for n in g.node:
            for name in dict.fromkeys(i for i in n.input if i):  # a node reading a tensor twice is one consumer
                self._consumers.setdefault(name, []).append(n)
            if n.name:
                self._by_name.setdefault(n.name, n)

    # ----------------------------------------------------------------------------------------- lookups

    def producer(self, name: str) -> NodeProto | None:
        """The node that writes tensor ``name``; None for graph inputs and initializers."""
        return self._producer.get(name)

    def consumers(self, name: str) -> list[NodeProto]:
        """The nodes that read tensor ``name``, each once, in graph order."""
        return list(self._consumers.get(name, ()))

    def only_consumer(self, name: str) -> NodeProto | None:
        """The one node reading ``name``, or None when several do, none does, or it is also a graph output,
        because only then can a rewrite change the tensor without changing what something else sees."""
        users = self._consumers.get(name, [])
        if name in self.outputs or len(users) != 1:
            return None
        return users[0]

    def node(self, name: str) -> NodeProto | None:
        """The first node called ``name`` (names are optional in ONNX and may repeat)."""
        return self._by_name.get(name)

    def is_constant(self, name: str) -> bool:
        """Whether ``name`` is an initializer or a Constant node's output."""
        return name in self.initializers or name in self.constant_nodes

    def array(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (an initializer, or a Constant node's ``value``) as numpy; None for
        anything computed at run time."""
        if name in self.initializers:
            return self._numpy_helper.to_array(self.initializers[name])
        node = self.constant_nodes.get(name)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return self._numpy_helper.to_array(a.t)
        return None

    def arrays(self) -> dict[str, np.ndarray]:
        """Every constant tensor of the graph by name, for checks that read them all."""
        names = list(self.initializers) + [k for k in self.constant_nodes if k not in self.initializers]
        out = {}
        for k in names:
            v = self.array(k)
            if v is not None:
                out[k] = v
        return out

    def elem_type(self, name: str) -> int | None:
        """The ``onnx.TensorProto`` element type of a constant tensor, without decoding its data; None for
        anything computed at run time."""
        if name in self.initializers:
            return int(self.initializers[name].data_type)
        node = self.constant_nodes.get(name)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return int(a.t.data_type)
        return None

    # ------------------------------------------------------------------------------------------- edits

    def add_initializer(self, name: str, value: np.ndarray) -> str:
        """Append ``value`` as a new initializer called ``name`` and return the name, because a rewrite must
        never overwrite a constant that another node may share."""
        self.graph.initializer.append(self._numpy_helper.from_array(np.asarray(value), name))
        self.initializers[name] = self.graph.initializer[-1]
        return name

    def remove_nodes(self, nodes: Iterable[NodeProto]) -> None:
        """Remove these nodes from the graph; the index keeps answering for the graph before the removal
        until :meth:`refresh`."""
        for n in list(nodes):
            self.graph.node.remove(n)
