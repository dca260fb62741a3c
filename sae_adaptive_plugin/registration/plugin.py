"""This package's own SAELens plugin: registers its architectures through the public hook.

It goes through exactly the path a third-party plugin would: the ``sae_lens.plugins`` entry point
``sae_adaptive_plugin = "sae_adaptive_plugin.registration.plugin"`` and the
``sae_lens_architectures`` hook. Each architecture module under :mod:`sae_adaptive_plugin.saes`
exposes ``ARCHITECTURE``. Its releases (``sae_lens_releases``) are the entries of the packaged
``sae_adaptive_plugin/releases.yaml``, read on the first lookup of SAELens's directory.
"""

from __future__ import annotations

import importlib
from typing import Any

from sae_adaptive_plugin.registration.hookspecs import Architecture, hookimpl
from sae_adaptive_plugin.registration.releases import PACKAGE_RELEASES_FILE, read_releases_file

#: The package's architectures that choose k per row (sparsity adapts to the input).
ADAPTIVE_ARCHITECTURES: tuple[str, ...] = ("softsae", "adaptivek")
#: The package's architecture trained for every budget ``k' <= k`` at once.
HIERARCHICAL_ARCHITECTURE = "hierarchical_topk"
#: The one list of this package's architectures; each is the module of that name in ``saes/``.
PACKAGE_ARCHITECTURES: tuple[str, ...] = (HIERARCHICAL_ARCHITECTURE, *ADAPTIVE_ARCHITECTURES)


@hookimpl
def sae_lens_architectures() -> list[Architecture]:
    architectures = [
        importlib.import_module(f"sae_adaptive_plugin.saes.{name}").ARCHITECTURE
        for name in PACKAGE_ARCHITECTURES
    ]
    # also name the reference-checkpoint converters in SAELens (adaptivek_ref, softsae_ref in
    # NAMED_PRETRAINED_SAE_LOADERS: usable as a release's conversion_func)
    from sae_adaptive_plugin.hub.reference_import import register_reference_loaders

    register_reference_loaders()
    return architectures


@hookimpl
def sae_lens_releases() -> dict[str, dict[str, Any]]:
    return read_releases_file(PACKAGE_RELEASES_FILE)
