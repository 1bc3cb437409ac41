"""Offline pipeline: checkpoint -> ONNX -> parity gate -> precision variants (-> TensorRT engines)."""
