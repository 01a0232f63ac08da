"""ONNX initializers stored outside the model file: allowed only when the manifest pins every file.

ONNX lets tensors live in side files (``location`` in a tensor's ``external_data``); ONNX Runtime reads
them from the model's folder at load. The manifest hash covers the ``.onnx`` file only, so swapping a
side file would change the weights (and the answers) under a valid hash and a valid signature.
Every external file must therefore be listed in the manifest's ``external_data`` (file name -> sha256),
be a regular file in the artifact's folder, and match its hash; anything else is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ...errors import ManifestError
from ...manifest import Manifest, sha256_file, sibling_file


def _tensors_of_graph(graph) -> Iterator:
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    for node in graph.node:
        yield from _tensors_of_node(node)


def _tensors_of_node(node) -> Iterator:
    for a in node.attribute:
        if a.HasField("t"):
            yield a.t
        yield from a.tensors
        if a.HasField("g"):
            yield from _tensors_of_graph(a.g)
        for g in a.graphs:
            yield from _tensors_of_graph(g)


def external_locations(model) -> set[str]:
    """File names every externally stored tensor points at (graph, subgraphs, functions)."""
    from onnx import TensorProto

    tensors = list(_tensors_of_graph(model.graph))
    for fn in model.functions:
        for node in fn.node:
            tensors.extend(_tensors_of_node(node))
    out = set()
    for t in tensors:
        if t.data_location == TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if not loc:
                raise ManifestError(f"Tensor {t.name!r} is stored externally but names no file.")
            out.add(loc)
    return out


def check_external_data(artifact: Path, manifest: Manifest, model) -> list[str]:
    """Refuse external tensors not pinned by the manifest; returns the verified file names."""
    locations = external_locations(model)
    if not locations:
        return []
    pinned = manifest.external_data or {}  # file name -> sha256 (its types are checked when the manifest is read)
    missing = sorted(loc for loc in locations if loc not in pinned)
    if missing:
        raise ManifestError(
            f"{artifact.name} keeps weights in external file(s) {missing} that its manifest does not pin with a "
            "sha256, so they could be swapped under a valid hash and signature; refusing to load it. Re-export "
            "the model as one file, or list each file and its sha256 under external_data and re-sign.")
    for loc in sorted(locations):
        path = sibling_file(artifact, loc, "external data file")
        actual = sha256_file(path)
        if actual != pinned[loc]:
            raise ManifestError(f"External data file {loc} of {artifact.name} does not match its manifest "
                                f"(sha256 {actual[:16]}...); it was modified or replaced.")
    return sorted(locations)
