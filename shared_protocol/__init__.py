"""FaceRecon's wire protocol: messages, framing, error codes and limits (standard library only).

`shared_protocol.client` (the DEALER client) additionally needs pyzmq and is imported explicitly.
"""
from .errors import ErrorCode, ProtocolError
from .messages import (DEFAULT_OUTPUTS, MESSAGE_TYPES, OUTPUT_KINDS, PROTOCOL_VERSION, STAGES, Accepted, Cancel,
                       Error, Message, PersonPhoto, Ping, Pong, Progress, ReconstructOptions, ReconstructRequest,
                       Result, ResultFile, Status, StatusRequest, decode, encode)
from . import limits

__all__ = ["ErrorCode", "ProtocolError", "DEFAULT_OUTPUTS", "MESSAGE_TYPES", "OUTPUT_KINDS", "PROTOCOL_VERSION",
           "STAGES", "Accepted", "Cancel", "Error", "Message", "PersonPhoto", "Ping", "Pong", "Progress",
           "ReconstructOptions",
           "ReconstructRequest", "Result", "ResultFile", "Status", "StatusRequest", "decode", "encode",
           "limits"]
