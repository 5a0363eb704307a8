"""One family of errors for bad input. The CLI prints ``str(err)`` as one line and exits 2."""


class MedsegError(Exception):
    """Base class: the input or request was wrong; the message says what to do."""


class InputError(MedsegError):
    """An input file or argument cannot be used (missing, unreadable, wrong dimension, NaN...)."""


class DicomError(InputError):
    """A DICOM folder or file cannot be turned into a volume."""


class GeometryError(MedsegError):
    """Two volumes that must share a voxel grid do not."""


class OutputError(MedsegError):
    """An output cannot be written (unwritable, would overwrite an input or an existing file)."""


class WeightsError(MedsegError):
    """Model weights are missing, corrupted, or do not match the architecture."""


class PromptError(MedsegError):
    """A prompt (point, box, slice index) is outside the image or malformed."""


class CheckpointConfigError(MedsegError):
    """A checkpoint's configuration cannot be honoured by this inference request."""


class Cancelled(MedsegError):
    """The caller cancelled the work (``cancel=`` of :func:`medseg.segment`, Cancel in napari)."""
