"""The project's one exception base, and how any exception becomes one readable line.

A `DispersionScalingError` is a user error: its message names the field or input, the
bad value and the fix, and the command-line entry points print it on one line without a
traceback. Anything else that escapes is a bug and keeps its traceback.
"""


MESSAGE_LIMIT = 600
"""A user error's text is cut to this many characters (its middle goes): a value pasted or expanded into a
message (a 10 MB line, a huge study name) must not become a 10 MB error line. Head and tail survive, so
the key and the fix stay readable."""


def shorten(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text`, or its head and tail with ' ... ' between when it is longer than `limit`."""
    if len(text) <= limit:
        return text
    keep = limit - 5
    return f"{text[: keep // 2]} ... {text[len(text) - (keep - keep // 2):]}"


def short_repr(value, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, for messages that quote user input."""
    return shorten(repr(value), limit)


class DispersionScalingError(Exception):
    """Base for every error the project raises on purpose (bad input, bad config)."""

    def __str__(self) -> str:
        return shorten(super().__str__())


class ConfigError(DispersionScalingError, ValueError):
    """A study file, search space or option is invalid."""


class DataError(DispersionScalingError, ValueError):
    """A text source is missing, empty or malformed."""


class ModelError(DispersionScalingError, ValueError):
    """A model or tokenizer cannot be loaded or used as asked."""


class TrainingFailure(DispersionScalingError, RuntimeError):
    """A training run failed for a reason worth recording (e.g. a NaN loss)."""


class TrackingUnavailable(DispersionScalingError, RuntimeError):
    """The MLflow store did not answer within the retry budget; what was trained is kept."""


def one_line(exc: BaseException, limit: int = 500) -> str:
    """`Type: message` of the innermost cause of a (possibly Ray-wrapped) exception.

    Ray wraps a worker's exception in layers whose text repeats the traceback; the cause at
    the bottom holds the reason, and its last non-empty line is the message itself.
    """
    seen = set()
    while getattr(exc, "__cause__", None) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:limit]
