"""This package's own SAELens plugin: registers its architectures through the public hook.

It goes through exactly the path a third-party plugin would: the ``sae_lens.plugins`` entry point
``sae_adaptive_plugin = "sae_adaptive_plugin.registration.plugin"`` and the ``sae_lens_architectures`` hook.
Each architecture module under :mod:`sae_adaptive_plugin.saes` exposes ``ARCHITECTURE``.
"""

from __future__ import annotations

import importlib

from sae_adaptive_plugin.registration.hookspecs import Architecture, hookimpl

#: Architecture modules of this package, in :mod:`sae_adaptive_plugin.saes`.
ARCHITECTURE_MODULES: tuple[str, ...] = ("hierarchical_topk", "adaptivek", "softsae")


@hookimpl
def sae_lens_architectures() -> list[Architecture]:
    return [
        importlib.import_module(f"sae_adaptive_plugin.saes.{name}").ARCHITECTURE
        for name in ARCHITECTURE_MODULES
    ]
