"""Why a file has no label: kinds that code branches on, sentences for people.

An error row stores both: ``images.error_kind`` (a ``Kind``'s value, for queries
and for the code) and ``images.error`` (the one-line sentence, for people). Code
never branches on a sentence.
"""

from __future__ import annotations

from enum import Enum


class Kind(str, Enum):
    """The kind of reason a file could not be labeled."""

    GONE = "gone"  # no such file (a table's path, a file deleted since the walk)
    BROKEN_LINK = "broken_link"
    LINK_LOOP = "link_loop"
    PERMISSION = "permission"  # permission denied
    SPECIAL_FILE = "special_file"  # a FIFO, a socket, a device, a folder named like an image
    TOO_LARGE = "too_large"  # over --max-file-size (or inflating past it)
    UNLISTED_FOLDER = "unlisted_folder"  # a folder that cannot be listed
    UNREADABLE = "unreadable"  # an I/O error opening, stating or reading it
    NOT_AN_IMAGE = "not_an_image"  # an unrecognized format, a DICOM file without pixels
    UNSUPPORTED = "unsupported"  # a DICOM transfer syntax without an installed decoder
    OVER_LIMITS = "over_limits"  # a declared size over the limits (modlabel.limits)
    CORRUPT = "corrupt"  # the decoder failed on it
    DECODER_CRASHED = "decoder_crashed"  # it killed its decode worker (a signal)
    DECODE_MEMORY = "decode_memory"  # over --decode-memory
    DECODE_TIMEOUT = "decode_timeout"  # over --decode-timeout
    NO_BYTES = "no_bytes"  # a table's blob that is NULL


# Reasons that say nothing of a file's content, only that it could not be reached this
# time (a permission, an I/O error, a link loop): a file labeled before keeps its label.
ACCESS_KINDS = frozenset({Kind.PERMISSION, Kind.UNREADABLE, Kind.LINK_LOOP})
