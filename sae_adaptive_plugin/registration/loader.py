"""Plugin discovery for SAELens: entry points of group ``sae_lens.plugins`` → SAELens's registries.

SAELens has registries (``sae_lens.registry``) but no discovery. :func:`load_plugins` loads every
installed ``sae_lens.plugins`` entry point, asks it for its architectures through the pluggy hook
``sae_lens_architectures`` and registers them with ``register_sae_class`` /
``register_sae_training_class``. It is idempotent and defensive: a plugin that fails to import,
to answer the hook, or to register is logged with its traceback and skipped (a ``sys.exit`` in a
plugin included; ``KeyboardInterrupt`` is not caught); the others still register and
``import sae_lens`` never breaks. Registering the same classes again is a no-op; registering a
different class under a taken name is an :class:`ArchitectureClashError` naming both, and skips
only that architecture: the plugin's other architectures still register. A plugin may also (or
only) implement ``sae_lens_releases``; those releases join SAELens's pretrained-SAE directory on
its first lookup (:mod:`~sae_adaptive_plugin.registration.releases`), and each report lists them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from sae_adaptive_plugin.registration.hookspecs import (
    ENTRY_POINT_GROUP,
    PROJECT_NAME,
    Architecture,
    SAELensPluginSpec,
)
from sae_adaptive_plugin.registration.releases import (
    DIRECTORY_FUNCTION,
    install_directory_hook,
    merge_releases,
)

logger = logging.getLogger("sae_adaptive_plugin")


class ArchitectureClashError(ValueError):
    """An architecture name is already registered in SAELens to a different class.

    ``registered`` lists the architectures of the same call that did register.
    """

    def __init__(self, message: str, registered: list[str] | None = None) -> None:
        super().__init__(message)
        self.registered = registered or []


@dataclass
class PluginReport:
    """What loading one entry point did."""

    name: str
    value: str
    distribution: str | None
    architectures: list[str] = field(default_factory=list)
    error: str | None = None
    #: filled on the first directory lookup: releases added, releases skipped (name taken), error
    releases: list[str] = field(default_factory=list)
    releases_skipped: list[str] = field(default_factory=list)
    release_error: str | None = None
    plugin_name: str | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None and self.release_error is None


_lock = threading.RLock()
_reports: dict[tuple[str, str], PluginReport] = {}
_loading = False


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}" if obj is not None else "None"


def _distribution_of(ep: metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None
    return f"{dist.metadata['Name']} {dist.version}"


def _check_architecture(arch: Any, plugin: str) -> Architecture:
    from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig

    if not isinstance(arch, Architecture):
        raise TypeError(f"plugin {plugin!r} returned {arch!r}, expected an Architecture")
    if not isinstance(arch.name, str) or not arch.name:
        raise TypeError(f"plugin {plugin!r} returned an architecture without a name")
    pairs = (
        (arch.sae_class, SAE, arch.sae_config_class, SAEConfig, "inference"),
        (
            arch.training_sae_class,
            TrainingSAE,
            arch.training_sae_config_class,
            TrainingSAEConfig,
            "training",
        ),
    )
    for cls, base, cfg_cls, cfg_base, kind in pairs:
        if (cls is None) != (cfg_cls is None):
            raise TypeError(
                f"plugin {plugin!r}, architecture {arch.name!r}: the {kind} SAE class and its "
                "config class must both be given or both be None"
            )
        if cls is None:
            continue
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"{_qualname(cls)} is not a subclass of {_qualname(base)}")
        if not (isinstance(cfg_cls, type) and issubclass(cfg_cls, cfg_base)):
            raise TypeError(f"{_qualname(cfg_cls)} is not a subclass of {_qualname(cfg_base)}")
        if cfg_cls.architecture() != arch.name:
            raise ValueError(
                f"{_qualname(cfg_cls)}.architecture() is {cfg_cls.architecture()!r}, "
                f"but plugin {plugin!r} registers it as {arch.name!r}"
            )
    if arch.sae_class is None and arch.training_sae_class is None:
        raise TypeError(f"plugin {plugin!r}, architecture {arch.name!r}: no classes given")
    return arch


def register_architectures(architectures: list[Architecture], plugin: str) -> list[str]:
    """Register architectures into SAELens; returns the names registered.

    A malformed architecture raises before anything registers. A name taken by a different class
    skips that architecture only: the others register, then :class:`ArchitectureClashError`
    (naming both classes; ``registered`` lists the names that did register) is raised.
    """
    from sae_lens import registry

    checked = [_check_architecture(arch, plugin) for arch in architectures]
    registered: list[str] = []
    clashes: list[str] = []
    for arch in checked:
        halves = (
            (
                registry.SAE_CLASS_REGISTRY,
                registry.register_sae_class,
                "inference",
                (arch.sae_class, arch.sae_config_class),
            ),
            (
                registry.SAE_TRAINING_CLASS_REGISTRY,
                registry.register_sae_training_class,
                "training",
                (arch.training_sae_class, arch.training_sae_config_class),
            ),
        )
        todo: list[tuple[dict[str, Any], Any, tuple[Any, Any]]] = []
        clash = None
        for table, register, kind, pair in halves:
            if pair[0] is None:
                continue
            existing = table.get(arch.name)
            if existing is None:
                todo.append((table, register, pair))
            elif tuple(existing) != pair:
                clash = (
                    f"SAELens {kind} architecture {arch.name!r} is already registered to "
                    f"{_qualname(existing[0])} (config {_qualname(existing[1])}); plugin "
                    f"{plugin!r} tries to register {_qualname(pair[0])} "
                    f"(config {_qualname(pair[1])}). Uninstall one of them or rename one."
                )
                break
        if clash is not None:
            clashes.append(clash)
            continue
        for table, register, pair in todo:
            if arch.name not in table:
                register(arch.name, *pair)
        registered.append(arch.name)
    registered = sorted(set(registered))
    if clashes:
        kept = ", ".join(registered) if registered else "none"
        raise ArchitectureClashError(
            " ".join(clashes) + f" Registered the plugin's other architectures: {kept}.",
            registered=registered,
        )
    return registered


def _load_entry_point(ep: metadata.EntryPoint, manager: pluggy.PluginManager) -> PluginReport:
    report = PluginReport(name=ep.name, value=ep.value, distribution=_distribution_of(ep))
    where = f"{ep.name!r} ({ep.value}" + (
        f", from {report.distribution})" if report.distribution else ")"
    )
    try:
        plugin = ep.load()
        if manager.is_registered(plugin):
            plugin_name = manager.get_name(plugin)
        else:
            plugin_name = manager.register(plugin, name=ep.name)
        report.plugin_name = plugin_name
        impls = [
            impl
            for impl in manager.hook.sae_lens_architectures.get_hookimpls()
            if impl.plugin_name == plugin_name
        ]
        if not impls and not _release_impls(manager, plugin_name):
            raise TypeError(f"it implements no hook of project {PROJECT_NAME!r}")
        architectures: list[Architecture] = []
        for impl in impls:
            architectures.extend(impl.function() or [])
        report.architectures = register_architectures(architectures, ep.name)
    except ArchitectureClashError as exc:
        report.architectures = exc.registered
        report.error = f"{type(exc).__name__}: {exc}"
        logger.warning("SAELens plugin %s clashed: %s", where, report.error, exc_info=True)
    except SystemExit as exc:  # a plugin calling sys.exit must not end the host program
        report.error = f"SystemExit: the plugin called sys.exit({exc.code!r}) while loading"
        logger.warning("SAELens plugin %s was skipped: %s", where, report.error, exc_info=True)
    except Exception as exc:
        report.error = f"{type(exc).__name__}: {exc}"
        logger.warning("SAELens plugin %s was skipped: %s", where, report.error, exc_info=True)
    return report


def load_plugins(*, raise_errors: bool = False) -> list[PluginReport]:
    """Register every installed SAELens plugin; safe to call any number of times.

    Returns one :class:`PluginReport` per entry point seen so far. Entry points installed since
    the last call are loaded; those already loaded are not loaded again. With
    ``raise_errors=True`` the first failed plugin raises ``RuntimeError`` after all are tried.
    """
    global _loading
    import sae_lens  # noqa: F401  (the autoload hook may run the loading itself here)

    with _lock:
        if not _loading:
            _loading = True
            try:
                manager = _plugin_manager()
                for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
                    key = (ep.name, ep.value)
                    if key not in _reports:
                        _reports[key] = _load_entry_point(ep, manager)
            finally:
                _loading = False
        reports = list(_reports.values())
    _install_directory_hook()  # outside _lock: the first directory lookup takes them the other way
    failed = [r for r in reports if not r.ok]
    if raise_errors and failed:
        raise RuntimeError(
            "SAELens plugins failed: " + "; ".join(f"{r.name}: {r.error}" for r in failed)
        )
    return reports


_directory_hook_failed = False


def _install_directory_hook() -> None:
    global _directory_hook_failed
    if _directory_hook_failed:
        return
    try:
        install_directory_hook(add_plugin_releases)
    except Exception:  # never break `import sae_lens`: release names then resolve as before
        _directory_hook_failed = True
        logger.warning(
            "could not hook SAELens's pretrained-SAE directory: plugin releases are not added",
            exc_info=True,
        )


def _release_impls(manager: pluggy.PluginManager, plugin_name: str | None) -> list[Any]:
    return [
        impl
        for impl in manager.hook.sae_lens_releases.get_hookimpls()
        if impl.plugin_name == plugin_name
    ]


def release_hooks() -> list[tuple[PluginReport, list[Callable[[], Any]]]]:
    """Each loaded plugin that implements ``sae_lens_releases``, with its hook functions."""
    manager = _plugin_manager()
    with _lock:
        reports = [r for r in _reports.values() if r.plugin_name is not None]
    pairs = []
    for report in reports:
        impls = _release_impls(manager, report.plugin_name)
        if impls:
            pairs.append((report, [impl.function for impl in impls]))
    return pairs


def add_plugin_releases(directory: dict[str, Any]) -> None:
    """Add every loaded plugin's ``sae_lens_releases`` to SAELens's ``directory`` (in place),
    recording in each report what was added or skipped; a plugin whose hook raises or returns an
    entry off the schema is logged and skipped (its ``release_error``)."""
    for report, hooks in release_hooks():
        source = f"SAELens plugin {report.name!r} ({report.value})"
        report.releases, report.releases_skipped, report.release_error = [], [], None
        try:
            for hook in hooks:
                added, skipped = merge_releases(directory, hook() or {}, source)
                report.releases += added
                report.releases_skipped += skipped
        except SystemExit as exc:
            report.release_error = f"SystemExit: the plugin called sys.exit({exc.code!r})"
        except Exception as exc:
            report.release_error = f"{type(exc).__name__}: {exc}"
        if report.release_error:
            logger.warning(
                "the releases of %s were skipped: %s", source, report.release_error, exc_info=True
            )


_manager: pluggy.PluginManager | None = None


def _plugin_manager() -> pluggy.PluginManager:
    global _manager
    if _manager is None:
        _manager = pluggy.PluginManager(PROJECT_NAME)
        _manager.add_hookspecs(SAELensPluginSpec)
    return _manager


def plugins_command(args: Any) -> int:
    """``sae-adaptive plugins``: print each installed plugin and what it registered."""
    from sae_lens import registry
    from sae_lens.loading import pretrained_saes_directory

    reports = load_plugins()
    if reports:  # the plugins' releases join SAELens's directory on its first lookup
        getattr(pretrained_saes_directory, DIRECTORY_FUNCTION)()
    if not reports:
        print("no SAELens plugins installed (entry-point group 'sae_lens.plugins')")
    for report in reports:
        print(f"{report.name}  ({report.distribution or 'unknown distribution'}; {report.value})")
        if report.error:
            print(f"  FAILED: {report.error}")
        if report.release_error:
            print(f"  RELEASES FAILED: {report.release_error}")
        for name in report.releases:
            print(f"  release {name}")
        for name in report.releases_skipped:
            print(f"  release {name}  (skipped: already in SAELens's directory)")
        for name in report.architectures:
            kinds = [
                kind
                for kind, table in (
                    ("inference", registry.SAE_CLASS_REGISTRY),
                    ("training", registry.SAE_TRAINING_CLASS_REGISTRY),
                )
                if name in table
            ]
            print(f"  {name:<24} {' + '.join(kinds)}")
    if args.all:
        from_plugins = {name for r in reports for name in r.architectures}
        builtin = sorted(
            (set(registry.SAE_CLASS_REGISTRY) | set(registry.SAE_TRAINING_CLASS_REGISTRY))
            - from_plugins
        )
        print("SAELens built-in: " + ", ".join(builtin))
    return 1 if any(not r.ok for r in reports) else 0
