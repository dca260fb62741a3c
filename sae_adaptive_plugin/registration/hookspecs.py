"""pluggy hook specifications through which a package adds SAE architectures and releases to SAELens.

Project name ``sae_lens_plugins``; plugins are discovered from the entry-point group
``sae_lens.plugins``. A plugin is any importable object (usually a module) with a function
decorated by :data:`hookimpl` that returns the architectures it provides::

    from sae_adaptive_plugin.registration.hookspecs import Architecture, hookimpl

    @hookimpl
    def sae_lens_architectures():
        return [Architecture("my_arch", MySAE, MySAEConfig, MyTrainingSAE, MyTrainingSAEConfig)]

    @hookimpl
    def sae_lens_releases():  # optional: release name -> pretrained_saes.yaml entry
        return read_releases_file(Path(__file__).with_name("releases.yaml"))

and, in the plugin's ``pyproject.toml``::

    [project.entry-points."sae_lens.plugins"]
    my_plugin = "my_package.sae_lens_plugin"
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pluggy

PROJECT_NAME = "sae_lens_plugins"
ENTRY_POINT_GROUP = "sae_lens.plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class Architecture(NamedTuple):
    """One architecture a plugin adds to SAELens.

    Either half may be ``None``: an inference-only architecture has no training classes, and a
    training architecture that saves as another inference architecture (like SAELens's
    ``batchtopk``, saved as ``jumprelu``) has no inference classes of its own.
    """

    name: str
    sae_class: type[Any] | None
    sae_config_class: type[Any] | None
    training_sae_class: type[Any] | None = None
    training_sae_config_class: type[Any] | None = None


class SAELensPluginSpec:
    """The hooks a SAELens plugin may implement."""

    @hookspec
    def sae_lens_architectures(self) -> list[Architecture]:  # type: ignore[empty-body]
        """Return the architectures this plugin provides (registered by :func:`load_plugins`)."""

    @hookspec
    def sae_lens_releases(self) -> dict[str, dict[str, Any]]:  # type: ignore[empty-body]
        """Return release name → entry in the schema of SAELens's ``pretrained_saes.yaml``
        (``repo_id``, ``model``, ``conversion_func``, ``config_overrides``, ``saes``: a list of
        ``{id, path, l0, variance_explained, neuronpedia}``). Called only on the first lookup
        of SAELens's pretrained-SAE directory, which then holds them
        (:mod:`sae_adaptive_plugin.registration.releases`)."""
