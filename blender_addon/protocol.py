"""The wire protocol for the add-on: `shared_protocol`, vendored inside the built add-on.

`build_addon.py` copies the repository's `shared_protocol/` into the add-on as a subpackage, so
the installed extension needs nothing outside itself but pyzmq (shipped as wheels). Run from the
repository (development, tests of the unbuilt package) the top-level `shared_protocol` is used.
Type checkers see the top-level one (the same code; the vendored copy exists only in the build).
"""
import importlib.util
from typing import TYPE_CHECKING

if not TYPE_CHECKING and importlib.util.find_spec(f"{__package__}.shared_protocol") is not None:
    from .shared_protocol import (PROTOCOL_VERSION, Accepted, Cancel, Error, ErrorCode, Message, PersonPhoto, Ping,
                                  Progress, ProtocolError, ReconstructOptions, Result, ResultFile, Status,
                                  StatusRequest, limits)
    from .shared_protocol.client import Client, load_curve_keys, read_server_public_key
    from .shared_protocol.shape_keys import NEUTRAL_SUFFIX, SUFFIX as SHAPE_KEYS_SUFFIX, decode_shape_keys
else:
    from shared_protocol import (PROTOCOL_VERSION, Accepted, Cancel, Error, ErrorCode, Message, PersonPhoto, Ping,  # noqa: F401
                                 Progress, ProtocolError, ReconstructOptions, Result, ResultFile, Status,
                                 StatusRequest, limits)
    from shared_protocol.client import Client, load_curve_keys, read_server_public_key  # noqa: F401
    from shared_protocol.shape_keys import NEUTRAL_SUFFIX, SUFFIX as SHAPE_KEYS_SUFFIX, decode_shape_keys  # noqa: F401
