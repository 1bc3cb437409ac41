"""ONNX Runtime sessions: the one place their options are set (served models, gates, benches)."""

from __future__ import annotations

from typing import Callable

import numpy as np


def session_options(intra_op_threads: int = 0, allow_spinning: bool = True):
    """ONNX Runtime options for a CPU encoder serving small batches.

    Sequential execution: an encoder is one chain of layers, and ORT_PARALLEL only adds
    inter-op scheduling (MiniLM int8, one sentence, 2 threads: ~2.3x slower). intra_op_threads
    0: ONNX Runtime decides. allow_spinning: pool threads busy-wait for work (the spec's
    instances field); on a 2-core machine shared with Triton and clients, off was faster for
    single sentences and 8 concurrent clients alike.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if intra_op_threads:
        so.intra_op_num_threads = intra_op_threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return so


def open_session(path: str, intra_op_threads: int = 0, allow_spinning: bool = True, gpu_device: int | None = None):
    import onnxruntime as ort

    providers: list = ["CPUExecutionProvider"]
    if gpu_device is not None:
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu_device}))
    return ort.InferenceSession(path, session_options(intra_op_threads, allow_spinning), providers=providers)


def session_runner(session) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The generation engine's runner over an ONNX Runtime InferenceSession: every output by
    name, as ``session.run`` returns them (fresh arrays over ORT's own buffers: nothing is copied)."""
    names = [o.name for o in session.get_outputs()]
    run = session.run

    def runner(feeds):
        return dict(zip(names, run(names, feeds)))

    return runner
