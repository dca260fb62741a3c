"""sae-adaptive-plugin: adaptive-sparsity SAEs (AdaptiveK, SoftSAE, HierarchicalTopK) for SAELens.

Installing the package is enough: a ``.pth`` hook registers the architectures into SAELens as soon
as ``sae_lens`` is imported. Importing this package also registers them (the fallback where
``.pth`` files do not run, e.g. ``python -S`` or ``pip install --target``), unless the environment
variable ``SAE_ADAPTIVE_PLUGIN_NO_AUTOLOAD=1`` is set; :func:`load_plugins` always registers.
"""

from __future__ import annotations

import os

from sae_adaptive_plugin.hookspecs import Architecture, hookimpl
from sae_adaptive_plugin.loader import ArchitectureClashError, PluginReport, load_plugins

__version__ = "0.1.0"
AUTOLOAD_OPT_OUT_ENV = "SAE_ADAPTIVE_PLUGIN_NO_AUTOLOAD"

__all__ = [
    "AUTOLOAD_OPT_OUT_ENV",
    "Architecture",
    "ArchitectureClashError",
    "PluginReport",
    "hookimpl",
    "load_plugins",
]

if os.environ.get(AUTOLOAD_OPT_OUT_ENV, "") in ("", "0"):
    load_plugins()
