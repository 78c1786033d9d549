"""Errors raised while fetching or reading a data set."""

from __future__ import annotations

from anycast.core.errors import AnycastError, IntegrityError


class DatasetError(AnycastError):
    """A data set could not be fetched or read; the message says how to provide it."""

    status = 503
    code = "dataset_unavailable"


class DatasetChecksumError(DatasetError, IntegrityError):
    """A downloaded or supplied data set file does not match its pinned checksum."""

    status = 422
    code = "dataset_checksum"
