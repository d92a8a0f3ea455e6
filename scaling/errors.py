"""The project's one exception base.

A `DispersionScalingError` is a user error: its message names the field or input, the
bad value and the fix, and the command-line entry points print it on one line without a
traceback. Anything else that escapes is a bug and keeps its traceback.
"""


class DispersionScalingError(Exception):
    """Base for every error the project raises on purpose (bad input, bad config)."""


class ConfigError(DispersionScalingError, ValueError):
    """A study file, search space or option is invalid."""


class DataError(DispersionScalingError, ValueError):
    """A text source is missing, empty or malformed."""


class ModelError(DispersionScalingError, ValueError):
    """A model or tokenizer cannot be loaded or used as asked."""


class TrainingFailure(DispersionScalingError, RuntimeError):
    """A training run failed for a reason worth recording (e.g. a NaN loss)."""
