"""Checkpoint -> fp32 ONNX with named dynamic batch and sequence axes.

Uses torch.onnx's dynamo exporter: the TorchScript exporter (``dynamo=False``) was seen
to produce MiniLM graphs whose pooled embeddings had cosine 0.92 against PyTorch on the
very inputs it traced (transformers 5 builds masks in ways it mis-traces). The parity
gate in :mod:`export.parity` is what catches such a graph either way.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln_core.manifest import TensorSpec
from kiln_core.spec import DeploymentSpec, Task

log = logging.getLogger(__name__)

TOKENIZER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    input_names: list[str]
    output_name: str
    architecture: str
    hidden_size: int
    labels: list[str] | None
    config: object = None


def load_encoder(spec: DeploymentSpec, checkpoint: Path) -> LoadedModel:
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    config = AutoConfig.from_pretrained(checkpoint)
    kwargs = dict(attn_implementation="eager", dtype=torch.float32)
    if spec.task is Task.text_classification:
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint, **kwargs)
        output = "logits"
        labels = spec.labels or [config.id2label[i] for i in range(config.num_labels)]
        if len(labels) != config.num_labels:
            raise ValueError(f"labels: spec gives {len(labels)} but the checkpoint has {config.num_labels} classes")
    else:
        model = AutoModel.from_pretrained(checkpoint, **kwargs)
        output = "last_hidden_state"
        labels = None
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    accepted = inspect.signature(model.forward).parameters
    names = [n for n in TOKENIZER_INPUTS if n in tokenizer.model_input_names and n in accepted]
    if "input_ids" not in names or "attention_mask" not in names:
        raise ValueError(f"{config.model_type}: expected input_ids and attention_mask inputs, got {names}")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        input_names=names,
        output_name=output,
        architecture=(config.architectures or [type(model).__name__])[0],
        hidden_size=int(config.hidden_size),
        labels=labels,
        config=config,
    )


class _Wrapper(torch.nn.Module):
    """Positional inputs in manifest order -> the one output tensor."""

    def __init__(self, model: torch.nn.Module, input_names: list[str], output_name: str):
        super().__init__()
        self.model, self.input_names, self.output_name = model, input_names, output_name

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.input_names, tensors)))
        return getattr(out, self.output_name)


def io_specs(loaded: LoadedModel) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs = [TensorSpec(name=n, dtype="int64", shape=["batch", "sequence"]) for n in loaded.input_names]
    if loaded.output_name == "logits":
        outputs = [TensorSpec(name="logits", dtype="float32", shape=["batch", len(loaded.labels or [])])]
    else:
        outputs = [TensorSpec(name=loaded.output_name, dtype="float32", shape=["batch", "sequence", loaded.hidden_size])]
    return inputs, outputs


def export_onnx(loaded: LoadedModel, out_path: Path, opset: int) -> Path:
    """Trace with a small example; batch and sequence stay dynamic (named axes)."""
    sample = loaded.tokenizer(["kiln export example", "a second, longer example sentence"], padding=True, return_tensors="pt")
    args = tuple(sample[n] for n in loaded.input_names)
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=1, max=8192)
    dynamic = {n: {0: batch, 1: seq} for n in loaded.input_names}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _Wrapper(loaded.model, loaded.input_names, loaded.output_name).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            args,
            str(out_path),
            input_names=loaded.input_names,
            output_names=[loaded.output_name],
            dynamic_shapes={"tensors": tuple(dynamic[n] for n in loaded.input_names)},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return out_path
