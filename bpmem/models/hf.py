"""``--hf MODEL_TYPE``: a Hugging Face ``transformers`` model built from its config alone (no
download, no weights), with a synthetic batch the config sizes, as any other model of yours.

- **The config:** ``AutoConfig.for_model(MODEL_TYPE, **overrides)``, the overrides from
  ``--hf-config`` (JSON text, or the path of a local ``config.json``). Under fake tensors the
  model is built on the meta device, as every ``--model`` is, so a 70B shape costs nothing.
- **The head:** the model type's usual one (``default_head``): image classification for a
  vision config, a seq2seq LM for an encoder-decoder, a masked LM where the type has one (BERT,
  RoBERTa), else a causal LM. ``--hf-head`` picks another of ``HEADS``.
- **The batch:** keyword inputs with ``labels``, so the model computes its own loss (``--loss
  none``): ``input_ids`` (B, ``--seq-len``) below the vocabulary, or ``pixel_values`` (B, C,
  H, W) at the config's image size; labels per token for the LMs, one class per row for the
  classifiers (the config's ``num_labels``).

transformers is an optional extra (``pip install 'bpmem[hf]'``); without it ``--hf`` says so
in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bpmem.models.user_model import TensorShape, UserModel, UserModelError

HEADS: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
}
FACTORY = "bpmem.models.hf:build"
DEFAULT_SEQ_LEN = 128


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UserModelError("--hf", "needs the transformers package, which is not installed; allowed: pip install "
                                     "'bpmem[hf]'") from None
    transformers.logging.set_verbosity_error()  # a config without weights is the point, not a warning
    return transformers


def config_overrides(text: str | dict[str, Any] | None) -> dict[str, Any]:
    """``--hf-config``: JSON text, or the path of a local config.json (or its folder)."""
    if text is None or isinstance(text, dict):
        return dict(text or {})
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        text = path.read_text()
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserModelError("--hf-config", f"{str(text)[:60]!r} is neither JSON nor a config.json file "
                                            f"({error}); allowed: e.g. '{{\"num_hidden_layers\": 4}}' or "
                                            "path/to/config.json") from None
    if not isinstance(overrides, dict):
        raise UserModelError("--hf-config", "allowed: a JSON object, e.g. '{\"num_hidden_layers\": 4}'")
    return overrides


def make_config(model_type: str, overrides: dict[str, Any]) -> Any:
    transformers = _transformers()
    overrides = {k: v for k, v in overrides.items() if k not in ("model_type", "architectures", "transformers_version")}
    try:
        return transformers.AutoConfig.for_model(model_type, **overrides)
    except ValueError as error:
        if "Unrecognized model identifier" in str(error):
            raise UserModelError("--hf", f"{model_type!r} is not a transformers model type; allowed: a model_type "
                                         "such as llama, gpt2, bert, t5, vit") from None
        raise UserModelError("--hf-config", f"{error}".splitlines()[0]) from None


def default_head(config: Any) -> str:
    """The head a model type is usually trained with."""
    from transformers.models.auto import modeling_auto

    kind = config.model_type
    if hasattr(config, "image_size") and kind in modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return "image-classification"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq-lm"
    if kind in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked-lm"
    return "causal-lm"


def build(model_type: str, config: dict[str, Any] | None = None, head: str | None = None) -> Any:
    """The factory ``--hf`` names: the model of ``model_type`` with ``head``, from its config."""
    transformers = _transformers()
    made = make_config(model_type, config or {})
    head = head or default_head(made)
    return getattr(transformers, HEADS[head]).from_config(made)


def hf_model(model_type: str, config: str | dict[str, Any] | None = None, head: str | None = None,
             seq_len: int | None = None, blocks: str | None = None) -> UserModel:
    """The workload of ``--hf``: ``build`` as the factory, the batch from the config."""
    overrides = config_overrides(config)
    made = make_config(model_type, overrides)
    if head is not None and head not in HEADS:
        raise UserModelError("--hf-head", f"{head!r} is not a head; allowed: {', '.join(HEADS)}")
    head = head or default_head(made)
    tokens = seq_len or min(DEFAULT_SEQ_LEN, getattr(made, "max_position_embeddings", DEFAULT_SEQ_LEN) or
                            DEFAULT_SEQ_LEN)
    classes = getattr(made, "num_labels", 2)
    if head == "image-classification":
        size = made.image_size if isinstance(made.image_size, int) else made.image_size[0]
        channels = getattr(made, "num_channels", 3)
        shapes = [f"pixel_values=float32[B,{channels},{size},{size}]", f"labels=int64[B]<{classes}"]
    else:
        vocab = made.vocab_size
        labels = f"labels=int64[B]<{classes}" if head == "sequence-classification" else \
            f"labels=int64[B,{tokens}]<{vocab}"
        shapes = [f"input_ids=int64[B,{tokens}]<{vocab}", labels]
    kwargs = json.dumps({"model_type": model_type, "config": overrides, "head": head}, sort_keys=True)
    inputs = tuple(TensorShape.parse(text, "--hf") for text in shapes)
    return UserModel(FACTORY, kwargs, inputs=inputs, loss="none", blocks_path=blocks, name=f"hf:{model_type}")
