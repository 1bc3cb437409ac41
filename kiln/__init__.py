"""kiln: Hugging Face checkpoint -> parity-gated ONNX -> Triton repository -> running Triton."""

__version__ = "0.1.0"
