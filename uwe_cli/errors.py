"""Typed errors. Every `UweError` is a user-facing problem: the CLI prints its message on one line, exits 2."""


class UweError(Exception):
    """Bad input or an impossible request; the message names the culprit and, where possible, the fix."""


class PoolError(UweError):
    """A pool file is missing, unreadable or does not follow the schema."""


class SelectionError(UweError):
    """The selection request cannot be met (budget, labeled/exclude files, strategy needs)."""


class LabelError(UweError):
    """Ground-truth labels that cannot be used (missing, unknown IDs, a single class)."""


class ModelError(UweError):
    """A model name, factory, checkpoint or layer that cannot be used."""


class DataError(UweError):
    """An image source (folder, manifest, image file) that cannot be used."""


class ResourceError(UweError):
    """The job would not fit in memory, or asks for a device that is not there."""


class OutputError(UweError):
    """An output path that cannot or must not be written (an input, a directory, a full disk)."""


class StorageError(UweError):
    """A remote location that cannot be used (missing bucket or key, credentials, endpoint, package)."""


class BatchError(UweError):
    """A batch file that cannot be read, or that does not belong to the pool it is paired with."""


class ExportError(UweError):
    """An export or report request the pool cannot satisfy (no boxes, a class without a name)."""


class StdoutClosed(OutputError):
    """The reader of stdout closed it early (`uwe select --out - | head`): not an error to report."""
