"""Errors raised on purpose by geonorm-fx. Every one derives from :class:`GeoNormError`."""
from __future__ import annotations


class GeoNormError(Exception):
    """Base class: something about the input or the request is wrong; the message says what and what to do."""


class CaptureError(GeoNormError):
    """The model could not be captured as an fx graph; the message names the cause and a fix to try."""


class NoSitesError(GeoNormError):
    """``strict=True`` was requested but no residual-plus-normalization site was rewritten."""


class ScheduleError(GeoNormError, ValueError):
    """The decay schedule is not one of the named schedules, a sequence of the right length, or a callable."""


class InvalidInputError(GeoNormError, TypeError):
    """An argument is of the wrong kind (e.g. not a model, bad ``tracer``, bad ``kinds``)."""


class ConversionError(GeoNormError):
    """The captured graph could not be rewritten consistently (e.g. the train and eval graphs disagree)."""


class GeoNormWarning(UserWarning):
    """A conversion went ahead with a compromise the user should know about (e.g. static shapes)."""


class InputShapeError(GeoNormError, ValueError):
    """A converted module was called with an input whose shape its capture does not accept: a size at a
    dim the capture fixed (static), outside the bounds torch.export put on a dynamic dim, or another
    number of dims. The message names the input, the dim, both sizes and how to fix it."""
