"""Fold the fused preprocessing into the first convolution where that is exact.

The exported graph starts ``uint8 -> Cast -> Concat(g, g, g) -> Mul(scale) -> Add(offset) ->
Transpose(NHWC->NCHW) -> Conv``. On a 2-core CPU those element-wise steps over three replicated channels
cost about 9% of a ResNet50 forward pass, and a per-channel affine map in front of a convolution is
linear algebra that the convolution can absorb:

- replication: ``conv(W, [g, g, g]) = conv(sum_c W[:, c], g)``: exact, and the first convolution does a
  third of its MACs;
- scale: ``conv(W, s * x) = conv(W * s, x)``: exact up to float rounding;
- offset: an unpadded convolution turns a constant offset into a bias (exact); a padded one does not
  (its zero border would become ``-offset``), so the offset stays as one Add on the single channel, which
  needs the same offset / scale on every channel.

Caffe mode (ResNet50: per-channel ImageNet means, padded 7x7 first conv) meets neither condition for the
replication, so its graph is left as exported and the reason is recorded. The FP32 parity gate against
Keras checks whatever this produces, as it checks every export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..extras import require


@dataclass(frozen=True)
class FoldResult:
    folded: bool
    reason: str  # what was folded, or why not

    def to_dict(self) -> dict:
        return {"folded": self.folded, "what": self.reason}


class _Graph:
    """Name lookups over one ONNX graph: producers, consumers, constants."""

    def __init__(self, model):
        numpy_helper = require("onnx.numpy_helper")
        self.model = model
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.consts = {n.output[0]: n for n in self.g.node if n.op_type == "Constant"}
        self._np = numpy_helper
        self.outputs = {o.name for o in self.g.output}

    def consumers(self, name: str) -> list:
        return [n for n in self.g.node if name in n.input]

    def only_consumer(self, name: str):
        users = self.consumers(name)
        if name in self.outputs or len({id(u) for u in users}) != 1:
            return None
        return users[0]

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return self._np.to_array(self.inits[name])
        if name in self.consts:
            attr = self.consts[name].attribute[0]
            if attr.name == "value":
                return self._np.to_array(attr.t)
        return None

    def set_initializer(self, name: str, value: np.ndarray) -> str:
        """A fresh initializer (never overwrites one another node may share)."""
        new = f"{name}__folded"
        self.g.initializer.append(self._np.from_array(value, new))
        return new


def _attr(node, name, default=None):
    helper = require("onnx.helper")
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _per_channel(a: np.ndarray, c: int) -> np.ndarray | None:
    """A Mul/Add constant that broadcasts along the last (channel) axis only, as a length-c vector."""
    if a.size == 1:
        return np.full(c, float(a.reshape(())), np.float64)
    if a.shape[-1] == c and a.size == c:
        return a.reshape(c).astype(np.float64)
    return None


def fold_input_preprocessing(model) -> FoldResult:
    """Rewrite ``model`` (an ``onnx.ModelProto``) in place; says what it did or why it did nothing."""
    G = _Graph(model)
    inp = G.g.input[0].name
    cast = G.only_consumer(inp)
    if cast is None or cast.op_type != "Cast":
        return FoldResult(False, "the graph does not start with the exported Cast")
    node = G.only_consumer(cast.output[0])
    concat = node if node is not None and node.op_type == "Concat" else None
    if concat is not None:
        if set(concat.input) != {cast.output[0]} or _attr(concat, "axis") not in (3, -1):
            return FoldResult(False, "the channel Concat is not a replication of the grey channel")
        mul = G.only_consumer(concat.output[0])
        replicas = len(concat.input)
    else:
        mul, replicas = node, 1
    if mul is None or mul.op_type != "Mul":
        return FoldResult(False, "no normalisation multiply after the cast")
    add = G.only_consumer(mul.output[0])
    if add is None or add.op_type != "Add":
        return FoldResult(False, "no normalisation add after the multiply")
    tr = G.only_consumer(add.output[0])
    if tr is None or tr.op_type != "Transpose" or list(_attr(tr, "perm", [])) != [0, 3, 1, 2]:
        return FoldResult(False, "the normalised input does not go straight to an NHWC->NCHW transpose")
    conv = G.only_consumer(tr.output[0])
    if conv is None or conv.op_type != "Conv" or conv.input[0] != tr.output[0] or (_attr(conv, "group", 1) != 1):
        return FoldResult(False, "the normalised input does not feed one plain convolution")
    w = G.const(conv.input[1])
    b = G.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if w is None or w.ndim != 4 or (len(conv.input) > 2 and conv.input[2] and b is None):
        return FoldResult(False, "the first convolution's weights are not constants")
    c = w.shape[1]
    s_raw = G.const(mul.input[1]) if mul.input[0] in (concat.output[0] if concat else cast.output[0],) else None
    o_raw = G.const(add.input[1]) if add.input[0] == mul.output[0] else None
    if s_raw is None or o_raw is None:
        return FoldResult(False, "the normalisation constants are not initialisers")
    s, o = _per_channel(s_raw, c), _per_channel(o_raw, c)
    if s is None or o is None or np.any(s == 0):
        return FoldResult(False, "the normalisation is not a per-channel affine map")
    pads = list(_attr(conv, "pads", [0, 0, 0, 0]))
    auto_pad = _attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    padded = any(pads) or auto_pad in ("SAME_UPPER", "SAME_LOWER")
    shift = o / s  # conv(W, s*g + o) = conv(W*s, g + o/s)
    uniform_shift = np.allclose(shift, shift[0], rtol=0, atol=1e-6 * max(1.0, abs(shift[0])))
    if padded and np.any(o != 0) and not uniform_shift:
        why = ("the first convolution is padded and the normalisation offset differs per channel (e.g. caffe-mode "
               "ImageNet means): its zero border would change, so it is not folded into the convolution")
        if concat is None:
            return FoldResult(False, why)
        return _replicate_by_broadcast(G, cast, concat, mul, add, s, o, why)

    w64 = w.astype(np.float64) * s.reshape(1, c, 1, 1)
    bias = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
    keep_shift = None
    if np.any(o != 0):
        if padded:
            keep_shift = float(shift[0])
        else:  # an unpadded conv sees the offset everywhere: it is a bias
            bias = bias + (w64 * shift.reshape(1, c, 1, 1)).sum(axis=(1, 2, 3))
    if replicas > 1:
        w64 = w64.sum(axis=1, keepdims=True)
    new_w = G.set_initializer(conv.input[1], w64.astype(np.float32))
    new_b = G.set_initializer(conv.input[1] + "_bias", bias.astype(np.float32))

    # rewire: Cast -> [Add(shift)] -> Transpose -> Conv(W', b')
    head = cast.output[0]
    removed = [n for n in (concat, mul, add) if n is not None]
    if keep_shift is not None:
        shift_name = G.set_initializer(add.input[1], np.asarray(keep_shift, np.float32))
        add.input[0], add.input[1] = head, shift_name
        head = add.output[0]
        removed.remove(add)
    tr.input[0] = head
    one_channel = _one_channel_reshape(G, tr) if w64.shape[1] == 1 else False
    conv.input[1] = new_w
    if len(conv.input) > 2:
        conv.input[2] = new_b
    else:
        conv.input.append(new_b)
    for n in removed:
        G.g.node.remove(n)
    _drop_unused_initializers(G.g)
    _clear_stale_shapes(model)
    what = [f"channel replication ({replicas} -> 1) summed into the first convolution's weights"] if replicas > 1 else []
    what.append("scale folded into its weights")
    if np.any(o != 0):
        what.append("offset kept as one Add on the single input channel (the convolution is padded)" if keep_shift
                    is not None else "offset folded into its bias")
    if one_channel:
        what.append("the one-channel NHWC->NCHW transpose is a reshape")
    return FoldResult(True, "; ".join(what))


def _one_channel_reshape(G: _Graph, tr) -> bool:
    """With one channel, NHWC and NCHW are the same bytes: the Transpose becomes a Reshape.

    Runtimes treat a Transpose as data movement (OpenVINO ran this one with a reference kernel and kept
    the quantised input away from the first convolution); a Reshape costs nothing. Needs a static H, W.
    """
    helper = require("onnx.helper")
    dims = G.g.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[1:]) or dims[3].dim_value != 1:
        return False
    shape = G.set_initializer(tr.name + "_nchw_shape", np.asarray([-1, 1, dims[1].dim_value, dims[2].dim_value], np.int64))
    reshape = helper.make_node("Reshape", [tr.input[0], shape], list(tr.output), name=tr.name)
    idx = list(G.g.node).index(tr)
    G.g.node.remove(tr)
    G.g.node.insert(idx, reshape)
    return True


def _replicate_by_broadcast(G: _Graph, cast, concat, mul, add, s, o, why: str) -> FoldResult:
    """``concat(g, g, g) * s + o`` as ``g * s + o`` with (C,) constants: broadcasting replicates, exactly.

    One element-wise op over the three channels instead of three (Concat, Mul, Add); a unit scale drops
    the multiply as well.
    """
    c = len(s)
    if np.all(s == 1):
        add.input[0] = cast.output[0]
        removed = [concat, mul]
        what = "replication done by broadcasting the per-channel offset (one Add instead of Concat, Mul, Add)"
    else:
        mul.input[0] = cast.output[0]
        removed = [concat]
        what = "replication done by broadcasting the per-channel scale (Mul, Add instead of Concat, Mul, Add)"
    mul.input[1] = G.set_initializer(mul.input[1], s.astype(np.float32).reshape(c))
    add.input[1] = G.set_initializer(add.input[1], o.astype(np.float32).reshape(c))
    for n in removed:
        G.g.node.remove(n)
    _drop_unused_initializers(G.g)
    _clear_stale_shapes(G.model)
    return FoldResult(True, f"{what}; {why}")


def _drop_unused_initializers(g) -> None:
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for n in [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]:
        g.node.remove(n)
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _clear_stale_shapes(model) -> None:
    """Intermediate shape annotations from the exporter may now be wrong (3 channels -> 1); drop them."""
    del model.graph.value_info[:]
