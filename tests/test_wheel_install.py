"""The acceptance test of registration: build the wheel, install it into a fresh venv, and check
in new interpreters (cwd outside the repo, no PYTHONPATH) that importing only ``sae_lens``
registers this package's architectures, that the opt-out works, that a broken third-party plugin
is skipped with a warning, and that ``python -S`` falls back to ``import sae_adaptive_plugin``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from sae_adaptive_plugin.registration import plugin

#: builds the wheel and a fresh virtual environment: minutes
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
OURS = sorted(arch.name for arch in plugin.sae_lens_architectures())

CHECK = textwrap.dedent(
    """
    import json, sys
    started_with_plugin = "sae_adaptive_plugin" in sys.modules
    heavy_at_start = sorted(m for m in ("torch", "sae_lens", "pluggy") if m in sys.modules)
    import sae_lens
    from sae_lens import registry
    from sae_lens.saes.sae import SAEConfig
    from sae_lens.saes.sae import TrainingSAEConfig
    names = json.loads(sys.argv[1])
    loaded = {}
    for name in names:
        if name in registry.SAE_TRAINING_CLASS_REGISTRY:
            fields = {"architecture": name, "d_in": 8, "d_sae": 1024, "k": 8}
            cfg = TrainingSAEConfig.from_dict(fields)
            loaded[name] = type(cfg).__module__
    print(json.dumps({
        "started_with_plugin": started_with_plugin,
        "heavy_at_start": heavy_at_start,
        "inference": sorted(n for n in names if n in registry.SAE_CLASS_REGISTRY),
        "training": sorted(n for n in names if n in registry.SAE_TRAINING_CLASS_REGISTRY),
        "configs_from_dict": loaded,
        "plugin_imported": "sae_adaptive_plugin" in sys.modules,
    }))
    """
)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "SAE_ADAPTIVE"))}
    env.pop("VIRTUAL_ENV", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(root), "."],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    (wheel,) = root.glob("sae_adaptive_plugin-*.whl")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [
            *(str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"),
            *("-c", str(REPO / "constraints.txt"), str(wheel)),
        ],
        check=True,
        capture_output=True,
        env=_clean_env(),
    )
    # A third-party plugin whose entry point cannot be imported, installed beside ours.
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    dist_info = site / "broken_sae_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: broken-sae-plugin\nVersion: 0.1\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[sae_lens.plugins]\nbroken_one = broken_sae_plugin_does_not_exist.plugin\n"
    )
    (dist_info / "RECORD").write_text("")
    return env_dir


def _run(env_dir: Path, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(env_dir / "bin" / "python"), *args],
        cwd=cwd,
        env=_clean_env(**env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _check(env_dir: Path, cwd: Path, flags: tuple[str, ...] = (), **env: str) -> dict:
    proc = _run(env_dir, [*flags, "-c", CHECK, json.dumps(OURS)], cwd, **env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = proc.stderr
    return result


def test_importing_only_sae_lens_registers_every_architecture(fresh_venv: Path, tmp_path: Path):
    result = _check(fresh_venv, tmp_path)
    assert result["started_with_plugin"] is False
    assert result["heavy_at_start"] == []
    assert result["inference"] == OURS
    assert result["training"] == OURS
    assert sorted(result["configs_from_dict"]) == OURS
    assert all(m.startswith("sae_adaptive_plugin.") for m in result["configs_from_dict"].values())
    # the broken neighbour is named in a warning and did not stop ours
    assert "broken_one" in result["stderr"]
    assert "broken_sae_plugin_does_not_exist" in result["stderr"]


def test_opt_out_variable_registers_nothing(fresh_venv: Path, tmp_path: Path) -> None:
    result = _check(fresh_venv, tmp_path, SAE_ADAPTIVE_PLUGIN_NO_AUTOLOAD="1")
    assert result["inference"] == [] and result["training"] == []
    assert result["plugin_imported"] is False
    assert "broken_one" not in result["stderr"]


def test_python_dash_S_falls_back_to_importing_the_package(fresh_venv: Path, tmp_path: Path):
    site = next((fresh_venv / "lib").glob("python3*/site-packages"))
    bare = _check(fresh_venv, tmp_path, ("-S",), PYTHONPATH=str(site))
    assert bare["inference"] == []  # no .pth processing under -S
    script = "import sys, json; import sae_adaptive_plugin; from sae_lens import registry; "
    script += f"print(json.dumps(sorted(n for n in {OURS!r} if n in registry.SAE_CLASS_REGISTRY)))"
    proc = _run(fresh_venv, ["-S", "-c", script], tmp_path, PYTHONPATH=str(site))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == OURS


def test_cli_plugins_lists_this_package(fresh_venv: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(fresh_venv / "bin" / "sae-adaptive"), "plugins"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "sae-adaptive-plugin 0.1.0" in proc.stdout
    for name in OURS:
        assert name in proc.stdout
    assert "broken_one" in proc.stdout and "FAILED" in proc.stdout
    assert proc.returncode == 1  # a failed plugin is reported in the exit code


def test_package_provides_all_three_architectures() -> None:
    assert OURS == ["adaptivek", "hierarchical_topk", "softsae"]
