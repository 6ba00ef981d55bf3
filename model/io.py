"""Load exactly the backbone, or fail saying what does not match."""
from __future__ import annotations

import os
import tempfile

import h5py
import keras

from .backbone import build_backbone
from .config import ConfigError, ModelConfig


class BackboneMismatchError(ValueError):
    """The saved backbone does not fit what is being built; the message says what differs."""


def load_backbone(config_file: str, weights_file: str, expected_vocab_size: int | None = None,
                  dropout: float | None = None,
                  first_position_only: bool = False) -> tuple[keras.Model, ModelConfig]:
    """Build the backbone that `config_file` describes and load `weights_file` into it.

    `dropout` replaces the saved rate (a fine-tuning choice; it changes no weight);
    `first_position_only` builds it for a classifier (see build_backbone). Raises
    BackboneMismatchError when a file is missing, the vocabulary size differs from
    `expected_vocab_size`, or any weight's name or shape differs: nothing is skipped.
    """
    for path in (config_file, weights_file):
        if not os.path.exists(path):
            raise BackboneMismatchError(f"{path} is missing; point the flag at the --ckpt_dir "
                                        "of a finished train_bert_lm.py run")
    try:
        config = ModelConfig.from_json(config_file)
    except ConfigError as error:
        raise BackboneMismatchError(str(error)) from None
    if expected_vocab_size is not None and expected_vocab_size != config.vocab_size:
        raise BackboneMismatchError(
            f"{config_file}: vocab_size {config.vocab_size} but the vocabulary has "
            f"{expected_vocab_size} tokens; use the vocab.txt of the same run directory")
    if dropout is not None:
        config.dropout = dropout
    backbone = build_backbone(config, first_position_only)
    check_weight_layout(backbone, weights_file)
    backbone.load_weights(weights_file)
    return backbone, config


def weight_layout(path: str) -> dict[str, tuple]:
    """Every array in a Keras .weights.h5 file: its path inside the file -> its shape."""
    layout = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, item: layout.__setitem__(name, item.shape)
                      if isinstance(item, h5py.Dataset) else None)
    return layout


def check_weight_layout(backbone: keras.Model, weights_file: str) -> None:
    """Compare the file with what this backbone would save, name by name and shape by shape."""
    with tempfile.TemporaryDirectory() as tmp:
        reference = os.path.join(tmp, "reference.weights.h5")
        backbone.save_weights(reference)
        expected = weight_layout(reference)
    try:
        found = weight_layout(weights_file)
    except OSError as error:
        raise BackboneMismatchError(
            f"{weights_file}: not a readable weights file ({error})") from None
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or extra or reshaped:
        details = "; ".join(
            part for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {extra[:3]}" if extra else "",
                "shape of " + ", ".join(f"{k} {found[k]} != {expected[k]}" for k in reshaped[:3])
                if reshaped else "") if part)
        raise BackboneMismatchError(f"{weights_file} does not match the backbone its config.json "
                                    f"describes: {details}")
