"""llama-cpp-python's OpenAI-compatible server on the spec's GGUF file, as the chat baseline.

Optional: the `llama` extra (`make llama-cpp` builds it from source as a plain AVX2 build).
Its server runs one sequence at a time: concurrent requests wait on a lock (no parallel
slots like llama.cpp's own ``llama-server --parallel N``). It is started with
``--interrupt_requests false``: the default lets a newly arrived request cut the running
stream short. With ``--cache`` off (the default) the model object still keeps the previous
prompt's KV cache and reuses a matching prefix (llama.cpp's prefix match), which kiln's
engine does not do.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from kiln.baselines.process import BaselineProcess

MAKE_TARGET = "make llama-cpp"
# greedy as in kiln's engine: llama.cpp's server applies repeat_penalty 1.1 unless told otherwise
GREEDY_EXTRA = {"repeat_penalty": 1.0}
SERIALIZES = "serializes requests: one sequence at a time, no parallel slots (llama-server --parallel 8 has them)"


def unavailable() -> str | None:
    """Why the llama.cpp rows cannot run (None: they can)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama_cpp is not importable (install it with `{MAKE_TARGET}`, a several-minute source build)"
    try:
        import llama_cpp.server  # noqa: F401  the [server] extra
    except ImportError as err:
        return f"llama_cpp.server does not import ({err}); install llama-cpp-python[server] with `{MAKE_TARGET}`"
    return None


def version() -> str:
    from importlib import metadata

    return metadata.version("llama-cpp-python")


def server_command(gguf: Path, port: int, threads: int, n_ctx: int = 2048, host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", gguf.stem,
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
            "--host", host, "--port", str(port), "--interrupt_requests", "false", "--verbose", "false"]


def llama_process(gguf: Path, port: int, threads: int, log_file: Path, n_ctx: int = 2048) -> BaselineProcess:
    return BaselineProcess("llama-cpp-python server", server_command(gguf, port, threads, n_ctx), port, log_file,
                           ready_path="/v1/models")


# llama.cpp's own server binary (`llama-server`, ../shared/tools/build_llama_server.sh builds one):
# parallel slots, so N streams decode together as kiln's engine does; what the issues measure against
LLAMA_SERVER_ENV = "KILN_LLAMA_SERVER"
PARALLEL_NOTE = "llama-server with parallel slots (continuous batching)"


def llama_server_binary() -> Path | None:
    """The llama-server binary named by $KILN_LLAMA_SERVER, when it is an executable file."""
    import os

    path = os.environ.get(LLAMA_SERVER_ENV)
    return Path(path) if path and os.access(path, os.X_OK) else None


def llama_server_process(binary: Path, gguf: Path, port: int, threads: int, parallel: int, log_file: Path,
                         n_ctx: int = 2048) -> BaselineProcess:
    """``llama-server -m GGUF -t THREADS --parallel N`` (each slot gets n_ctx positions)."""
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "--parallel", str(parallel),
           "-c", str(n_ctx * parallel), "--host", "127.0.0.1", "--port", str(port), "--alias", gguf.stem,
           "--no-webui"]
    return BaselineProcess("llama-server", cmd, port, log_file, ready_path="/health")
