"""One config for every backbone, saved as config.json beside the weights."""
from __future__ import annotations

import dataclasses
import json
import os

BACKBONES = ("transformer", "textcnn")


class ConfigError(ValueError):
    """A config that cannot build a model; the message says which value and what to do."""


@dataclasses.dataclass
class ModelConfig:
    backbone: str = "textcnn"
    vocab_size: int = 30000
    d_model: int = 128
    num_layer: int = 6
    num_header: int = 8
    d_k: int = 16
    d_v: int = 16
    d_ff: int = 512
    dropout: float = 0.1
    max_position: int = 512
    type_vocab_size: int = 2
    filter_sizes: tuple = (2, 3, 4, 5)
    num_filters: int = 128
    initializer_range: float = 0.02
    pooled_tanh: bool = True

    def __post_init__(self):
        self.filter_sizes = tuple(int(k) for k in self.filter_sizes)
        self.validate()

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone {self.backbone!r} is not one of {', '.join(BACKBONES)}; "
                              "set --backbone")
        for name in ("vocab_size", "d_model", "num_layer", "num_header", "d_k", "d_v", "d_ff",
                     "max_position", "type_vocab_size", "num_filters"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}; "
                              "--dropout_keep_prob must be in (0, 1]")
        if not self.filter_sizes or min(self.filter_sizes) < 1:
            raise ConfigError(f"filter_sizes must be positive widths, got {self.filter_sizes}")

    def check_sequence_length(self, sequence_length: int) -> None:
        check_sequence_length(sequence_length, self.max_position)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["filter_sizes"] = list(self.filter_sizes)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; is this a config.json of this "
                              "project?")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"{path}: cannot read the model config ({error}); point the flag "
                              "at a run directory written by this project") from None


# The original's presets (d_model / d_k = d_v), 8 heads, 6 layers, d_ff 4 x d_model.
PRESETS = {
    "tiny": {"d_model": 64, "d_k": 8, "d_v": 8},
    "small": {"d_model": 128, "d_k": 16, "d_v": 16},
    "big": {"d_model": 512, "d_k": 64, "d_v": 64},
}


def check_sequence_length(sequence_length: int, max_position: int) -> None:
    """ConfigError unless a backbone with `max_position` positions can take `sequence_length`."""
    if sequence_length > max_position:
        raise ConfigError(f"sequence length {sequence_length} exceeds max_position "
                          f"{max_position}; lower --sequence_length or pretrain with a "
                          "larger --max_position")


def config_from_preset(name: str, **overrides) -> ModelConfig:
    """A preset with single values replaced; overrides that are None are ignored."""
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r} is not one of {', '.join(PRESETS)}; set --preset")
    values = {"num_header": 8, "num_layer": 6, **PRESETS[name]}
    values.update({k: v for k, v in overrides.items() if v is not None})
    values.setdefault("d_ff", 4 * values["d_model"])
    values.setdefault("num_filters", values["d_model"])
    return ModelConfig(**values)
