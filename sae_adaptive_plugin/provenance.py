"""What a saved SAE says about the package that provides its architecture.

SAELens writes ``cfg.json`` with a free-form ``metadata`` block; every SAE of this package records
there ``architecture_package`` (the distribution to ``pip install`` where SAELens does not know
the architecture) and ``architecture_package_version`` (the version that built or last loaded it).
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

#: The distribution that provides this package's architectures.
PACKAGE_NAME = "sae-adaptive-plugin"
#: Key under ``cfg.json``'s ``metadata`` naming the package that provides a plugin architecture.
PROVIDER_METADATA_KEY = "architecture_package"
#: Key under ``cfg.json``'s ``metadata`` with that package's version.
PROVIDER_VERSION_METADATA_KEY = "architecture_package_version"


def package_version() -> str:
    """The installed version of this package (its ``__version__`` when run from a source tree)."""
    try:
        return metadata.version(PACKAGE_NAME)
    except metadata.PackageNotFoundError:
        from sae_adaptive_plugin import __version__

        return __version__


def stamp_provider(cfg: Any) -> None:
    """Name this package and its version in ``cfg.metadata`` (a SAELens ``SAEMetadata``)."""
    cfg.metadata[PROVIDER_METADATA_KEY] = PACKAGE_NAME
    cfg.metadata[PROVIDER_VERSION_METADATA_KEY] = package_version()
