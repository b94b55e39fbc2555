"""One error hierarchy for both paths. HTTP status codes are attached here and used only at the
edge (the Flask error handler); messages say what went wrong and how to fix it."""

from __future__ import annotations


class PrelabelError(Exception):
    """Base class. ``status`` is the HTTP code the backend answers with."""

    status: int = 500


class SettingsError(PrelabelError):
    """An environment variable has an invalid value."""


class BadRequest(PrelabelError):
    """The request body is not what the protocol says it should be."""

    status = 400


class LabelConfigError(BadRequest):
    """The labeling config has nothing prelabel can predict, or cannot be parsed."""


class AnnotationError(BadRequest):
    """An annotation's result cannot be read (a brush region with wrong sizes or a corrupt RLE)."""


class NotFound(PrelabelError):
    """A model version or a job that does not exist (any more)."""

    status = 404


class ServiceUnavailable(PrelabelError):
    """A dependency (Redis, a worker, the model) is not there right now; retry later."""

    status = 503


class ModelUnavailable(ServiceUnavailable):
    """The model could not be loaded (missing weights, unsupported architecture)."""


class JobTimeout(PrelabelError):
    """A job did not finish within the time the backend may wait for it."""

    status = 504


class JobFailed(PrelabelError):
    """A job raised in the worker; the message carries the worker's error."""

    status = 500


class ImageError(PrelabelError):
    """One task's image could not be fetched or decoded. Fails that task, never the batch."""

    status = 422


class ImageFetchError(ImageError):
    """The image URL was refused or the download failed."""


class ImageDecodeError(ImageError):
    """The bytes are not a usable image (corrupt, truncated, too large, not an image)."""
