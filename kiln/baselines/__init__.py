"""Servers a user would pick instead of kiln, started by `kiln bench` beside kiln's own stack and
measured with the same load generator (kiln/loadgen.py):

- fastapi_torch: a FastAPI + PyTorch embedding server written the way people usually write one
- llamacpp_server: llama-cpp-python's OpenAI-compatible server on the same GGUF (optional extra
  `llama`, `make llama-cpp`)

process.BaselineProcess starts either on a free loopback port, polls it until ready and
always stops it.
"""
