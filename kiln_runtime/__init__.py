"""kiln_runtime: the served python runtime, copied whole into every generated repository.

Ground floor: it imports nothing of kiln's, only the standard library, numpy,
onnxruntime, tokenizers and jinja2, so a repository runs in the pip-installed Triton and
in NVIDIA's container alike. The Triton ``model.py`` files (model_repository/python_models)
are thin glue over it.

    contract     the tensor-name contract (standard library only)
    errors       InputError: the client's fault, answered as INVALID_ARG
    text         UTF-8 checks, the served tokenizer, batch padding
    ort          ONNX Runtime session options, set in this one place
    encoder      pooling, classification heads, the fused encoder
    generation   the continuous-batching chat engine and its request driver
"""
