"""Stable error codes shared by the backend, the CLI client and the Blender add-on.

A code never changes meaning once released; add new ones instead. Human messages may change.
"""
from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    # Framing and validation (the message itself is wrong).
    BAD_FRAMES = "bad_frames"                  # wrong number of frames, empty message
    BAD_HEADER = "bad_header"                  # header frame is not a UTF-8 JSON object
    UNKNOWN_TYPE = "unknown_type"              # header "type" names no message
    BAD_FIELD = "bad_field"                    # a field is missing, mistyped or out of range
    PAYLOAD_SIZE_MISMATCH = "payload_size_mismatch"  # declared payload size differs from the frame
    PAYLOAD_TOO_LARGE = "payload_too_large"    # a payload or header is over its limit
    PROTOCOL_MISMATCH = "protocol_mismatch"    # peer speaks another major protocol version
    # Server state.
    BUSY = "busy"                              # job queue full; retry later
    UNKNOWN_JOB = "unknown_job"                # cancel of a job the server does not know
    UNKNOWN_MODEL = "unknown_model"            # requested face model is not installed
    SHUTTING_DOWN = "shutting_down"            # server is stopping and takes no new work
    CANCELLED = "cancelled"                    # the job was cancelled by its client
    WORKER_FAILED = "worker_failed"            # the worker process died while running the job
    TIMEOUT = "timeout"                        # no answer in time (client side)
    UNREACHABLE = "unreachable"                # backend could not be reached (client side)
    JOB_LOST = "job_lost"                      # the backend restarted, or never got the request: no
                                               # answer will come; submit again (client side)
    # Input photo.
    BAD_IMAGE = "bad_image"                    # not a decodable image
    IMAGE_TOO_SMALL = "image_too_small"        # below the minimum side length
    IMAGE_TOO_LARGE = "image_too_large"        # over the pixel or byte limit
    OVER_MEMORY_BUDGET = "over_memory_budget"  # the job would need more memory than a worker has here
    NO_FACE = "no_face"                        # no face found in the photo
    FACE_INDEX_OUT_OF_RANGE = "face_index_out_of_range"  # asked for face N of fewer faces
    NO_USABLE_PHOTO = "no_usable_photo"        # several photos of one person (1.2), none gave a usable
                                               # face; the message names each photo and why
    # Anything else: a bug; the message says what happened.
    INTERNAL = "internal"


class ProtocolError(Exception):
    """The one exception type of the protocol layer: a stable code and a human message."""

    def __init__(self, code: ErrorCode, message: str, photo_name: str | None = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.photo_name = photo_name          # the photo of a several-photo request that failed (1.2)

    def __reduce__(self) -> tuple:            # picklable across worker processes
        return (ProtocolError, (self.code, self.message, self.photo_name))
