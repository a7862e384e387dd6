"""The transport: wire frames over asyncio TCP, TLS off loopback, link emulation.

``Server`` (cloud side, ``server.py``), ``Client`` and ``Session`` (device side,
``client.py``), TLS helpers (``tls.py``), byte accounting (``stats.py``) and link
emulation (``link.py``). This package exports that public surface.
"""

from privatelora.transport.client import Client, Session  # noqa: F401
from privatelora.transport.server import MAX_PENDING_WRITE, MAX_REFUSALS_IN_A_ROW, Server, ServerConnection  # noqa: F401
from privatelora.transport.stats import ByteStats, KindBytes  # noqa: F401
from privatelora.transport.streams import Redirected, RemoteError  # noqa: F401
from privatelora.transport.tls import (  # noqa: F401
                                       TLSRequiredError,
                                       client_ssl_context,
                                       is_loopback,
                                       make_self_signed,
                                       server_ssl_context,
)
