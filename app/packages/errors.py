"""Errors of the packages domain."""

from __future__ import annotations

from app.errors import InvalidParameterValue, LambentError, PayloadTooLarge


class InvalidZipFile(InvalidParameterValue):
    """The upload is not a zip file Lambent will unpack: corrupt, unsafe or a zip bomb."""

    type = "InvalidZipFileException"


class PackageTooLarge(PayloadTooLarge):
    type = "PackageTooLargeException"


class HandlerNotInPackage(InvalidParameterValue):
    """The handler is malformed, or names a file the package does not contain."""


class BlobNotFound(LambentError):
    """A package the database refers to is missing or damaged in the object store.

    This is the platform losing data, not a caller mistake, so it keeps the 500 status.
    """

    type = "PackageNotFound"
