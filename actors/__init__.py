"""Ray side of privatelora (installed as ``privatelora.actors``).

Ray reads ``RAY_AUTH_MODE`` when it is imported: once ``~/.ray/auth_token`` exists, a
local head requires the token, so token mode is switched on here, before any Ray import
of ours (import ``privatelora.actors`` before ``ray`` in your own scripts).
"""

from privatelora.placement.cluster import auth_env as _auth_env
import os as _os

for _k, _v in _auth_env().items():
    _os.environ.setdefault(_k, _v)
