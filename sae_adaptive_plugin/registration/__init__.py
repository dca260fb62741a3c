"""How this package plugs into SAELens: the plugin hook spec, the entry-point loader, our plugin."""

from sae_adaptive_plugin.registration.hookspecs import Architecture, hookimpl
from sae_adaptive_plugin.registration.loader import (
    ArchitectureClashError,
    PluginReport,
    load_plugins,
)

__all__ = ["Architecture", "ArchitectureClashError", "PluginReport", "hookimpl", "load_plugins"]
