"""TensorFlow-free inference runtime over ONNX Runtime / TensorRT (issue 4: not built yet).

Already usable without TensorFlow from the base install: :mod:`cxr_edge.decode`,
:mod:`cxr_edge.preprocess` and :mod:`cxr_edge.decision`.
"""
