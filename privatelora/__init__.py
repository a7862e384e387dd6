"""privatelora: PrivateLoRA split execution (device part / cloud part), no Ray here.

The Ray side (actors, placement) installs as ``privatelora.actors`` and
``privatelora.placement``; importing this package never imports Ray.
"""

__version__ = "0.1.0"
