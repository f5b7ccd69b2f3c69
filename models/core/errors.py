"""The error types every layer shares, each with its answer written once.

A `Problem` knows its HTTP status, its problem type (`urn:vqtok:problem:<slug>`, RFC 7807) and whether
the same request may succeed later (`retry`: the service adds `Retry-After`). The service answers any
`Problem` from these attributes alone (service/problems.py), the multi-process server sends one across
processes by class name (`problem_class`), and the command line and the local backend raise them as
they are. Torch-free.
"""

from __future__ import annotations

from typing import Any, ClassVar

EXIT_USAGE = 2


class CLIError(Exception):
    """A user error the command line reports in one line, with exit code `code`."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class ModelLoadError(Exception):
    """A model directory that cannot be used: missing/corrupt files, hash mismatch, no ONNX export."""


class ModelNotFound(ModelLoadError):
    """A model name or path that names no model directory."""


class SourceError(ValueError):
    """A dataset path that cannot be read as images (missing, empty, no image column, unknown kind)."""


class Problem(Exception):
    """An error a request can end in. `detail` is the one-line message; `extra` goes into the problem
    body as members of its own (e.g. the per-model states of a not-ready answer); `retry_after_s`, where
    the error knows when a retry may succeed, replaces the service's default `Retry-After`."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal"
    retry: ClassVar[bool] = False

    def __init__(self, detail: str = "", *, retry_after_s: float | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.extra = extra


class InvalidInputError(Problem, ValueError):
    """Images or token ids that do not fit the model (shape, dtype, grid, id range)."""

    status, slug = 422, "invalid-input"


class ImageError(Problem, ValueError):
    """Bytes (or an array) that are not a usable image of a supported format."""

    status, slug = 400, "undecodable-image"


class ImageTooLarge(Problem, ValueError):
    """Pixel count (or resulting token grid) over the configured limit."""

    status, slug = 413, "too-large"


class ImageShapeError(InvalidInputError):
    """A decodable image that does not fit the model under the requested resize mode."""


class UnknownModel(Problem, LookupError):
    """A model name the server does not hold."""

    status, slug = 404, "unknown-model"


class ModelNotReady(Problem):
    """A model that is loading, failed to load, or whose serving process is gone."""

    status, slug, retry = 503, "model-not-ready", True


class QueueFull(Problem):
    """The model's queue holds its limit of images already."""

    status, slug, retry = 503, "queue-full", True


class Overloaded(Problem):
    """The queue ahead of the request would outlast its deadline: refused on arrival, not after waiting."""

    status, slug, retry = 503, "overloaded", True


class ShuttingDown(Problem):
    """The model's batcher is stopping (server shutdown or model swapped out) and takes no new work."""

    status, slug, retry = 503, "shutting-down", True


class TooLarge(ImageTooLarge):
    """A request that alone holds more images or pixels than a model can ever queue or run: never retry it."""


class DeadlineExceeded(Problem):
    """The request outlived its deadline."""

    status, slug = 504, "deadline-exceeded"


class OutOfMemory(Problem):
    """The runtime ran out of memory on the batch this request was in; a smaller batch may fit later."""

    status, slug, retry = 503, "out-of-memory", True


class InferenceFailed(Problem):
    """The runtime failed on the batch this request was in (the server log has the cause)."""

    status, slug = 500, "inference-failed"


def inference_problem(exc: BaseException) -> Problem:
    """What a request whose batch raised `exc` in a runtime ends in."""
    if isinstance(exc, Problem):
        return exc
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "out of memory" in text or "failed to allocate" in text:
        return OutOfMemory("the model ran out of memory on this batch; retry")
    return InferenceFailed("inference failed for the batch this request was in")


def rebuild_problem(name: str, detail: str, *, retry_after_s: float | None = None, extra: dict[str, Any] | None = None) -> Problem:
    """The problem another process reported (class name, detail, retry, body members), rebuilt here without
    calling the subclass's own `__init__`, whose signature the message does not carry."""
    cls = problem_class(name)
    problem = cls.__new__(cls)
    Problem.__init__(problem, detail, retry_after_s=retry_after_s, **(extra or {}))
    return problem


def problem_class(name: str) -> type[Problem]:
    """The `Problem` subclass called `name` (the multi-process server sends errors by class name);
    `InferenceFailed` for a name no loaded subclass has."""
    pending: list[type[Problem]] = [Problem]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return cls
        pending.extend(cls.__subclasses__())
    return InferenceFailed
