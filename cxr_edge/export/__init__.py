"""Trained Keras models to gated ONNX artifacts (FP32/FP16/INT8), TensorRT engines and Triton repositories,
each with a manifest."""
