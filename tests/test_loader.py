"""load_plugins(): entry points → SAELens registries, with failures isolated and clashes named."""

from __future__ import annotations

import logging
import sys
import types
from dataclasses import dataclass

import pytest
from sae_lens import registry
from sae_lens.saes.topk_sae import (
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)

from sae_adaptive_plugin.registration import loader, plugin
from sae_adaptive_plugin.registration.hookspecs import Architecture, hookimpl


@dataclass
class _DemoConfig(TopKSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "demo_arch"


class _DemoSAE(TopKSAE):
    pass


@dataclass
class _DemoTrainingConfig(TopKTrainingSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "demo_arch"


class _DemoTrainingSAE(TopKTrainingSAE):
    pass


@dataclass
class _OtherDemoConfig(TopKSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "demo_arch"


class _OtherDemoSAE(TopKSAE):
    pass


def _module_plugin(name: str, architectures: list[Architecture]) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def sae_lens_architectures() -> list[Architecture]:
        return architectures

    module.sae_lens_architectures = sae_lens_architectures  # type: ignore[attr-defined]
    return module


def test_registers_architectures_in_both_registries(isolated) -> None:
    arch = Architecture("demo_arch", _DemoSAE, _DemoConfig, _DemoTrainingSAE, _DemoTrainingConfig)
    isolated({"demo": _module_plugin("demo", [arch])})
    reports = loader.load_plugins()
    assert [(r.name, r.architectures, r.error) for r in reports] == [("demo", ["demo_arch"], None)]
    assert registry.SAE_CLASS_REGISTRY["demo_arch"] == (_DemoSAE, _DemoConfig)
    assert registry.SAE_TRAINING_CLASS_REGISTRY["demo_arch"] == (
        _DemoTrainingSAE,
        _DemoTrainingConfig,
    )


def test_load_plugins_is_idempotent_and_same_classes_are_a_no_op(isolated) -> None:
    arch = Architecture("demo_arch", _DemoSAE, _DemoConfig)
    isolated({"demo": _module_plugin("demo", [arch]), "again": _module_plugin("again", [arch])})
    first = loader.load_plugins()
    second = loader.load_plugins()
    assert [r.ok for r in first] == [True, True]
    assert [r.architectures for r in second] == [["demo_arch"], ["demo_arch"]]


def test_broken_plugin_is_logged_and_skipped(isolated, caplog: pytest.LogCaptureFixture) -> None:
    def explode() -> list[Architecture]:
        raise RuntimeError("boom in hook")

    bad_hook = types.ModuleType("bad_hook")
    bad_hook.sae_lens_architectures = hookimpl(explode)  # type: ignore[attr-defined]
    isolated(
        {
            "missing": None,
            "bad_hook": bad_hook,
            "good": _module_plugin("good", [Architecture("demo_arch", _DemoSAE, _DemoConfig)]),
        }
    )
    with caplog.at_level(logging.WARNING, logger="sae_adaptive_plugin"):
        reports = {r.name: r for r in loader.load_plugins()}
    assert reports["good"].ok and "demo_arch" in registry.SAE_CLASS_REGISTRY
    assert "ModuleNotFoundError" in (reports["missing"].error or "")
    assert "boom in hook" in (reports["bad_hook"].error or "")
    logged = caplog.text
    assert "'missing'" in logged and "'bad_hook'" in logged and "Traceback" in logged
    with pytest.raises(RuntimeError, match="missing"):
        loader.load_plugins(raise_errors=True)


def test_name_clash_with_a_different_class_names_both(isolated) -> None:
    isolated(
        {
            "first": _module_plugin("first", [Architecture("demo_arch", _DemoSAE, _DemoConfig)]),
            "second": _module_plugin(
                "second", [Architecture("demo_arch", _OtherDemoSAE, _OtherDemoConfig)]
            ),
        }
    )
    reports = {r.name: r for r in loader.load_plugins()}
    assert reports["first"].ok
    error = reports["second"].error or ""
    assert "ArchitectureClashError" in error
    assert "_DemoSAE" in error and "_OtherDemoSAE" in error and "'second'" in error
    assert registry.SAE_CLASS_REGISTRY["demo_arch"][0] is _DemoSAE
    with pytest.raises(loader.ArchitectureClashError, match="already registered to"):
        loader.register_architectures(
            [Architecture("demo_arch", _OtherDemoSAE, _OtherDemoConfig)], "direct"
        )


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        (Architecture("demo_arch", None, None), "no classes given"),
        (Architecture("demo_arch", _DemoSAE, None), "both be given"),
        (Architecture("demo_arch", dict, _DemoConfig), "is not a subclass"),
        (Architecture("other_name", _DemoSAE, _DemoConfig), "registers it as 'other_name'"),
        ("not an Architecture", "expected an Architecture"),
    ],
)
def test_invalid_architectures_are_rejected_clearly(isolated, arch, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        loader.register_architectures([arch], "test")  # type: ignore[list-item]


def test_this_package_registers_through_its_entry_point() -> None:
    """The one check that every architecture of the package is registered, both halves."""
    reports = {r.value: r for r in loader.load_plugins()}
    ours = reports["sae_adaptive_plugin.registration.plugin"]
    assert ours.ok, ours.error
    architectures = plugin.sae_lens_architectures()
    assert ours.architectures == sorted(plugin.PACKAGE_ARCHITECTURES)
    assert sorted(arch.name for arch in architectures) == sorted(plugin.PACKAGE_ARCHITECTURES)
    for arch in architectures:
        assert registry.SAE_CLASS_REGISTRY[arch.name] == (arch.sae_class, arch.sae_config_class)
        assert registry.SAE_TRAINING_CLASS_REGISTRY[arch.name] == (
            arch.training_sae_class,
            arch.training_sae_config_class,
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(plugin.PACKAGE_ARCHITECTURES))
def test_importing_an_architecture_module_first_still_registers(name: str) -> None:
    """The first ``import sae_lens`` may come from inside one of our architecture modules."""
    import subprocess

    script = (
        "import importlib, sys\n"
        f"module = importlib.import_module('sae_adaptive_plugin.saes.{name}')\n"
        "from sae_lens import registry\n"
        "from sae_adaptive_plugin.registration.loader import load_plugins\n"
        "reports = [r for r in load_plugins() if r.value == 'sae_adaptive_plugin.registration.plugin']\n"
        "assert reports and reports[0].ok, reports\n"
        f"assert registry.SAE_CLASS_REGISTRY[{name!r}][0] is module.ARCHITECTURE.sae_class\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
