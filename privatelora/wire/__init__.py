"""The wire: typed messages <-> authenticated, length-prefixed frames (``frames.py``).

Modules: ``errors`` (refusals), ``schema`` (field checks, ``Geometry``), ``tensors``
(tensor records and wire dtypes), ``kinds`` (the frame-kind registry and the serving
kinds), ``training`` (the split-training kinds), ``bundle`` (many sessions' tensor frames in one), ``frames`` (framing, HMAC, lz4, the
encoder and the strict decoder). This package exports the codec's public surface, so
callers write ``wire.encode(...)``; the message classes are re-exported for convenience.
Layout and refusal codes: ``docs/wire.md``.
"""

from privatelora.runtime.messages import Activations, Close, Error, Handoff, Message, Open, Opened, Redirect, Reply  # noqa: F401
from privatelora.wire import training as _training  # noqa: F401  (registers kinds 16-21)
from privatelora.wire.bundle import ENTRY_LEN as BUNDLE_ENTRY_LEN, decode_bundle, encode_bundle  # noqa: F401
from privatelora.wire.errors import AuthError, FrameError, GeometryError, PrivacyError, SchemaError, WireError  # noqa: F401
from privatelora.wire.frames import (  # noqa: F401
                                          BUNDLE_CODE,
                                          CONNECTION_KEY,
                                          DEFAULT_MAX_FRAME,
                                          FLAG_DOWN,
                                          FLAG_LZ4,
                                          HEADER,
                                          MIN_LENGTH,
                                          PREFIX,
                                          TAG_LEN,
                                          VERSION,
                                          FrameInfo,
                                          Header,
                                          decode,
                                          decode_frame,
                                          encode,
                                          encode_frame,
                                          encode_many,
                                          frame_info,
                                          peek_header,
)
from privatelora.wire.kinds import HANDOFF_DTYPE, KEY_LEN, KINDS, Kind, kind_of, register  # noqa: F401
from privatelora.wire.schema import (  # noqa: F401
                                          DOWN,
                                          DTYPES,
                                          MAX_LAYERS,
                                          MAX_POSITION,
                                          MAX_REASON,
                                          MAX_TOKENS,
                                          UP,
                                          Geometry,
                                          session_geometry,
)
from privatelora.wire.tensors import CODE_DTYPES, DTYPE_CODES  # noqa: F401
