"""Where things may run (installed as ``privatelora.placement``).

Cloud and edge nodes are told apart by custom Ray resources: a backbone replica asks for
``CLOUD`` (inside a placement group of its own), an edge actor asks for ``EDGE`` and, once
started, checks its node really carries ``EDGE`` and refuses to run anywhere else.
Importing this package does not import Ray; the functions that need it import it.
"""

CLOUD = "privatelora_cloud"
EDGE = "privatelora_edge"


class PlacementError(RuntimeError):
    """An actor was asked to run where the privacy model forbids it."""
