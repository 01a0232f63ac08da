"""Fold the fused preprocessing into the first convolution where that is exact.

The exported graph starts ``uint8 -> Cast -> Concat(g, g, g) -> Mul(scale) -> Add(offset) ->
Transpose(NHWC->NCHW) -> Conv``. On a small CPU those element-wise steps over three replicated channels
are a noticeable share of a ResNet50 forward pass, and a per-channel affine map in front of a convolution is
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
from typing import Any

import numpy as np

from ..extras import require
from ..onnx_graph import GraphIndex, attr, drop_unused_initializers


@dataclass(frozen=True)
class FoldResult:
    folded: bool
    reason: str  # what was folded, or why not

    def to_dict(self) -> dict:
        return {"folded": self.folded, "what": self.reason}


class _NotFoldable(Exception):
    """Why the graph's head is not the exported preprocessing this fold knows; the graph is left as it is."""


@dataclass(frozen=True)
class _Head:
    """The matched ``Cast -> [Concat] -> Mul -> Add -> Transpose -> Conv`` chain in front of the first convolution."""

    cast: Any
    concat: Any  # None where the input already has the model's channels
    mul: Any
    add: Any
    tr: Any
    conv: Any
    replicas: int


def _folded_name(G: GraphIndex, name: str, value: np.ndarray) -> str:
    """A fresh initializer named after the one it replaces, because another node may share the original."""
    return G.add_initializer(f"{name}__folded", value)


def _per_channel(a: np.ndarray, c: int) -> np.ndarray | None:
    """A Mul/Add constant that broadcasts along the last (channel) axis only, as a length-c vector."""
    if a.size == 1:
        return np.full(c, float(a.reshape(())), np.float64)
    if a.shape[-1] == c and a.size == c:
        return a.reshape(c).astype(np.float64)
    return None


def fold_input_preprocessing(model) -> FoldResult:
    """Rewrite ``model`` (an ``onnx.ModelProto``) in place; says what it did or why it did nothing."""
    G = GraphIndex(model)
    try:
        head = _match_head(G)
        w, b = _first_conv_constants(G, head.conv)
        s, o = _normalisation(G, head, w.shape[1])
    except _NotFoldable as not_foldable:
        return FoldResult(False, str(not_foldable))
    padded = _is_padded(head.conv)
    shift = o / s  # conv(W, s*g + o) = conv(W*s, g + o/s)
    uniform_shift = np.allclose(shift, shift[0], rtol=0, atol=1e-6 * max(1.0, abs(shift[0])))
    if padded and np.any(o != 0) and not uniform_shift:
        why = ("the first convolution is padded and the normalisation offset differs per channel (e.g. caffe-mode "
               "ImageNet means): its zero border would change, so it is not folded into the convolution")
        if head.concat is None:
            return FoldResult(False, why)
        return _replicate_by_broadcast(G, head, s, o, why)
    w64, bias, keep_shift = _folded_weights(w, b, s, o, shift, padded, head.replicas)
    new_w = _folded_name(G, head.conv.input[1], w64.astype(np.float32))
    new_b = _folded_name(G, head.conv.input[1] + "_bias", bias.astype(np.float32))
    one_channel = _bypass_normalisation(G, head, new_w, new_b, keep_shift, w64.shape[1] == 1)
    return FoldResult(True, _describe_fold(head.replicas, o, keep_shift, one_channel))


def _match_head(G: GraphIndex) -> _Head:
    """The exported chain from the input to the first convolution, each node the only reader of the one before,
    because a tensor that anything else also reads must keep its value."""
    cast = G.only_consumer(G.graph.input[0].name)
    if cast is None or cast.op_type != "Cast":
        raise _NotFoldable("the graph does not start with the exported Cast")
    node = G.only_consumer(cast.output[0])
    concat = node if node is not None and node.op_type == "Concat" else None
    if concat is not None:
        if set(concat.input) != {cast.output[0]} or attr(concat, "axis") not in (3, -1):
            raise _NotFoldable("the channel Concat is not a replication of the grey channel")
        mul = G.only_consumer(concat.output[0])
        replicas = len(concat.input)
    else:
        mul, replicas = node, 1
    if mul is None or mul.op_type != "Mul":
        raise _NotFoldable("no normalisation multiply after the cast")
    add = G.only_consumer(mul.output[0])
    if add is None or add.op_type != "Add":
        raise _NotFoldable("no normalisation add after the multiply")
    tr = G.only_consumer(add.output[0])
    if tr is None or tr.op_type != "Transpose" or list(attr(tr, "perm", [])) != [0, 3, 1, 2]:
        raise _NotFoldable("the normalised input does not go straight to an NHWC->NCHW transpose")
    conv = G.only_consumer(tr.output[0])
    if conv is None or conv.op_type != "Conv" or conv.input[0] != tr.output[0] or (attr(conv, "group", 1) != 1):
        raise _NotFoldable("the normalised input does not feed one plain convolution")
    return _Head(cast, concat, mul, add, tr, conv, replicas)


def _first_conv_constants(G: GraphIndex, conv: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """The first convolution's weights and bias (None: it has none), because the fold computes new ones from them."""
    has_bias = len(conv.input) > 2 and bool(conv.input[2])
    w = G.array(conv.input[1])
    b = G.array(conv.input[2]) if has_bias else None
    if w is None or w.ndim != 4 or (has_bias and b is None):
        raise _NotFoldable("the first convolution's weights are not constants")
    return w, b


def _normalisation(G: GraphIndex, head: _Head, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and offset as length-``c`` vectors, because only a per-channel affine map commutes with the convolution."""
    data = head.concat.output[0] if head.concat is not None else head.cast.output[0]
    s_raw = G.array(head.mul.input[1]) if head.mul.input[0] == data else None
    o_raw = G.array(head.add.input[1]) if head.add.input[0] == head.mul.output[0] else None
    if s_raw is None or o_raw is None:
        raise _NotFoldable("the normalisation constants are not initialisers")
    s, o = _per_channel(s_raw, c), _per_channel(o_raw, c)
    if s is None or o is None or np.any(s == 0):
        raise _NotFoldable("the normalisation is not a per-channel affine map")
    return s, o


def _is_padded(conv: Any) -> bool:
    """Whether the convolution reads a zero border, because an offset folded into the bias would shift it too."""
    pads = list(attr(conv, "pads", [0, 0, 0, 0]))
    auto_pad = attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return any(pads) or auto_pad in ("SAME_UPPER", "SAME_LOWER")


def _folded_weights(w: np.ndarray, b: np.ndarray | None, s: np.ndarray, o: np.ndarray, shift: np.ndarray,
                    padded: bool, replicas: int) -> tuple[np.ndarray, np.ndarray, float | None]:
    """New weights and bias in float64, and the shift that must stay an Add (None: none), computed apart from
    the graph edits so the arithmetic reads on its own."""
    c = w.shape[1]
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
    return w64, bias, keep_shift


def _bypass_normalisation(G: GraphIndex, head: _Head, new_w: str, new_b: str, keep_shift: float | None,
                          one_channel: bool) -> bool:
    """Rewire ``Cast -> [Add(shift)] -> Transpose -> Conv(W', b')`` and drop what it bypasses; returns whether the
    transpose became a reshape, because the reason string says so."""
    head_out = head.cast.output[0]
    removed = [n for n in (head.concat, head.mul, head.add) if n is not None]
    if keep_shift is not None:
        shift_name = _folded_name(G, head.add.input[1], np.asarray(keep_shift, np.float32))
        head.add.input[0], head.add.input[1] = head_out, shift_name
        head_out = head.add.output[0]
        removed.remove(head.add)
    head.tr.input[0] = head_out
    reshaped = _one_channel_reshape(G, head.tr) if one_channel else False
    head.conv.input[1] = new_w
    if len(head.conv.input) > 2:
        head.conv.input[2] = new_b
    else:
        head.conv.input.append(new_b)
    G.remove_nodes(removed)
    drop_unused_initializers(G.graph, constant_nodes=True)
    _clear_stale_shapes(G.graph)
    return reshaped


def _describe_fold(replicas: int, o: np.ndarray, keep_shift: float | None, one_channel: bool) -> str:
    """What the fold did, for the export report."""
    what = [f"channel replication ({replicas} -> 1) summed into the first convolution's weights"] if replicas > 1 else []
    what.append("scale folded into its weights")
    if np.any(o != 0):
        what.append("offset kept as one Add on the single input channel (the convolution is padded)" if keep_shift
                    is not None else "offset folded into its bias")
    if one_channel:
        what.append("the one-channel NHWC->NCHW transpose is a reshape")
    return "; ".join(what)


def _one_channel_reshape(G: GraphIndex, tr: Any) -> bool:
    """With one channel, NHWC and NCHW are the same bytes: the Transpose becomes a Reshape.

    Runtimes treat a Transpose as data movement (OpenVINO ran this one with a reference kernel and kept
    the quantised input away from the first convolution); a Reshape costs nothing. Needs a static H, W.
    """
    helper = require("onnx.helper")
    dims = G.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[1:]) or dims[3].dim_value != 1:
        return False
    shape = _folded_name(G, tr.name + "_nchw_shape", np.asarray([-1, 1, dims[1].dim_value, dims[2].dim_value], np.int64))
    reshape = helper.make_node("Reshape", [tr.input[0], shape], list(tr.output), name=tr.name)
    idx = list(G.graph.node).index(tr)
    G.graph.node.remove(tr)
    G.graph.node.insert(idx, reshape)
    return True


def _replicate_by_broadcast(G: GraphIndex, head: _Head, s: np.ndarray, o: np.ndarray, why: str) -> FoldResult:
    """``concat(g, g, g) * s + o`` as ``g * s + o`` with (C,) constants: broadcasting replicates, exactly.

    One element-wise op over the three channels instead of three (Concat, Mul, Add); a unit scale drops
    the multiply as well.
    """
    cast, concat, mul, add = head.cast, head.concat, head.mul, head.add
    c = len(s)
    if np.all(s == 1):
        add.input[0] = cast.output[0]
        removed = [concat, mul]
        what = "replication done by broadcasting the per-channel offset (one Add instead of Concat, Mul, Add)"
    else:
        mul.input[0] = cast.output[0]
        removed = [concat]
        what = "replication done by broadcasting the per-channel scale (Mul, Add instead of Concat, Mul, Add)"
    mul.input[1] = _folded_name(G, mul.input[1], s.astype(np.float32).reshape(c))
    add.input[1] = _folded_name(G, add.input[1], o.astype(np.float32).reshape(c))
    G.remove_nodes(removed)
    drop_unused_initializers(G.graph, constant_nodes=True)
    _clear_stale_shapes(G.graph)
    return FoldResult(True, f"{what}; {why}")


def _clear_stale_shapes(graph: Any) -> None:
    """Intermediate shape annotations from the exporter may now be wrong (3 channels -> 1); drop them."""
    del graph.value_info[:]
