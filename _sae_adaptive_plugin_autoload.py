"""Autoload hook of sae-adaptive-plugin, run at interpreter start by ``sae_adaptive_plugin-autoload.pth``.

It imports nothing heavy: it only puts a small finder on ``sys.meta_path`` that waits for the first
``import sae_lens``; once ``sae_lens`` has finished importing it runs
``sae_adaptive_plugin.load_plugins()`` and removes itself. Set ``SAE_ADAPTIVE_PLUGIN_NO_AUTOLOAD=1``
to switch it off. Any failure is reported as a warning and never breaks the import of ``sae_lens``.
"""

import os
import sys

_ENV = "SAE_ADAPTIVE_PLUGIN_NO_AUTOLOAD"
_TARGET = "sae_lens"


def _disabled():
    return os.environ.get(_ENV, "") not in ("", "0")


def _run_load_plugins():
    if _disabled():
        return
    try:
        from sae_adaptive_plugin.registration.loader import load_plugins

        load_plugins()
    except Exception:  # never break `import sae_lens`
        import logging

        logging.getLogger("sae_adaptive_plugin").warning(
            "sae-adaptive-plugin could not register SAELens plugins", exc_info=True
        )


class _SAELensImportWatcher:
    """A meta-path finder that only wraps the loader of ``sae_lens`` and finds nothing itself."""

    _busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET or self._busy:
            return None
        self._busy = True
        try:
            import importlib.util

            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        _uninstall()
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            try:
                original_exec(module)
            finally:
                try:  # noqa: SIM105  (no contextlib at interpreter start)
                    del loader.exec_module  # back to the class's own method
                except AttributeError:
                    pass
            _run_load_plugins()

        loader.exec_module = exec_module
        return spec


_watcher = _SAELensImportWatcher()


def _uninstall():
    try:  # noqa: SIM105  (no contextlib at interpreter start)
        sys.meta_path.remove(_watcher)
    except ValueError:
        pass


def install():
    """Arrange for ``load_plugins()`` to run right after ``sae_lens`` is first imported."""
    if _disabled() or _watcher in sys.meta_path:
        return
    if _TARGET in sys.modules:
        _run_load_plugins()
        return
    sys.meta_path.insert(0, _watcher)


install()
