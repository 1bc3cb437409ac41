"""OpenAI-compatible API gateway in front of Triton (chat, completions, embeddings)."""
