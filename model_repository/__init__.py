"""Triton model repository writer: configs from typed protobufs, thin python-backend models."""
