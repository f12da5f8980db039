"""User-facing errors: each carries one sentence that says what is wrong and how to fix it.

`flaxalign.main` catches `FlaxalignError`, prints the sentence and exits with status 2.
"""

import dataclasses
from typing import Any


class FlaxalignError(Exception):
    """Base class of every error caused by user input (flags, configs, files)."""


class ConfigError(FlaxalignError):
    """A config value or flag is invalid."""


class DataError(FlaxalignError):
    """A data file or corpus is missing, empty or malformed."""


class MeshError(FlaxalignError):
    """The device mesh does not fit the devices or a parameter/batch dimension."""


class CheckpointError(FlaxalignError):
    """A checkpoint cannot be read or does not match the model."""


class TrainingError(FlaxalignError):
    """Training cannot go on (it diverged); the checkpoints already written are kept."""


def dataclass_fields(cls: type, values: Any, what: str) -> dict:
    """`values` (a dict or an `ml_collections.ConfigDict`) as keyword arguments of the dataclass `cls`; a key that
    is not one of its fields is a ConfigError naming `what` and the known fields."""
    values = values.to_dict() if hasattr(values, "to_dict") else dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {what} field(s) {unknown}; known fields: {sorted(known)}.")
    return values
