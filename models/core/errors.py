"""The error types every layer shares. Torch-free; each layer maps them to its own surface once
(the CLI to an exit code, the service to an HTTP status, the client to a typed exception)."""

from __future__ import annotations

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


class InvalidInputError(ValueError):
    """Images or token ids that do not fit the model (shape, dtype, grid, id range) (422)."""


class ImageError(ValueError):
    """Bytes (or an array) that are not a usable image of a supported format (400)."""


class ImageTooLarge(ValueError):
    """Pixel count (or resulting token grid) over the configured limit (413)."""


class ImageShapeError(ValueError):
    """A decodable image that does not fit the model under the requested resize mode (422)."""


class SourceError(ValueError):
    """A dataset path that cannot be read as images (missing, empty, no image column, unknown kind)."""
