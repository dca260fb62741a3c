"""sae-adaptive-plugin: adaptive-sparsity SAEs (AdaptiveK, SoftSAE, HierarchicalTopK) for SAELens.

Installing the package is enough: a ``.pth`` hook registers the architectures into SAELens as soon
as ``sae_lens`` is imported. Importing this package arranges the same (the fallback where ``.pth``
files do not run, e.g. ``python -S`` or ``pip install --target``): registration happens at once if
``sae_lens`` is already imported, else right after it is — so importing a light part of this
package (the CLI, ``ops``) does not pull in SAELens and torch. The environment variable
``SAE_ADAPTIVE_PLUGIN_NO_AUTOLOAD=1`` switches both off; :func:`load_plugins` always registers.
"""

from __future__ import annotations

import os

from sae_adaptive_plugin.registration.hookspecs import Architecture, hookimpl
from sae_adaptive_plugin.registration.loader import (
    ArchitectureClashError,
    PluginReport,
    load_plugins,
)

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


def _register_with_sae_lens() -> None:
    if os.environ.get(AUTOLOAD_OPT_OUT_ENV, "") not in ("", "0"):
        return
    try:
        import _sae_adaptive_plugin_autoload as autoload
    except ImportError:  # the top-level hook module is missing: register eagerly
        load_plugins()
    else:
        autoload.install()


_register_with_sae_lens()
