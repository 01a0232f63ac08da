"""Export of trained models to ONNX / TensorRT artifacts with manifests (issue 3: not built yet)."""
