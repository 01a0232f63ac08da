"""Benchmarks: latency, throughput and accuracy per backend x precision x batch, against Keras."""
