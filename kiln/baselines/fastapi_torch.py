"""A FastAPI + PyTorch embedding server, written the way people usually write one.

One sync endpoint, ``POST /v1/embeddings`` (OpenAI's request and response shape), that runs
transformers' AutoTokenizer + AutoModel on the checkpoint folder for every request: fp32,
``torch.no_grad``, mean pooling over the attention mask, L2 normalisation. No batching across
requests, no ONNX, no quantization; FastAPI runs the sync endpoint in its thread pool, so
concurrent requests call the model concurrently. ``kiln bench`` starts it as the baseline:

    python -m kiln.baselines.fastapi_torch --checkpoint DIR --model minilm --port 8080
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from transformers import AutoModel, AutoTokenizer


class EmbeddingRequest(BaseModel):
    model: str
    input: str | list[str]
    # other OpenAI fields (encoding_format, user, ...) are ignored: the answer is always floats


def create_app(checkpoint: Path | str, model_name: str, max_length: int = 256) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModel.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    app = FastAPI(title="FastAPI + PyTorch embeddings (baseline)")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/v1/embeddings")
    def embeddings(req: EmbeddingRequest):
        if req.model != model_name:
            raise HTTPException(404, f"model {req.model!r} not found")
        texts = [req.input] if isinstance(req.input, str) else req.input
        batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        vectors = torch.nn.functional.normalize(pooled, p=2, dim=1)
        tokens = int(batch["attention_mask"].sum())
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
            "model": model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a Hugging Face checkpoint folder")
    ap.add_argument("--model", required=True, help="the model name requests must carry")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args(argv)
    uvicorn.run(create_app(args.checkpoint, args.model, args.max_length), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
