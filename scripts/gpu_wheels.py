"""Gather the wheels `make gpu-check` needs on a lent GPU machine that cannot reach a registry.

That machine's image (/work/.library/device/KINDS.md, read 2026-11-17) has CUDA torch and the
packages in IMAGE_PACKAGES; this script walks the dependency closure of sae-adaptive-plugin (and
hatchling, to install it editable) as installed in the running environment, and downloads, for
CPython 3.12 on manylinux x86-64 and without dependencies, a wheel of each distribution the image
lacks into `.whl/` (ignored by git: add `/.whl/` to .git/info/exclude). Run it here, where pip
reaches the registry: `make gpu-wheels`.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

IMAGE_PACKAGES = {
    "absl-py",
    "accelerate",
    "aiofiles",
    "aiohappyeyeballs",
    "aiohttp",
    "aiosignal",
    "annotated-doc",
    "anyio",
    "attrs",
    "botorch",
    "build",
    "certifi",
    "charset-normalizer",
    "chex",
    "click",
    "cloudpickle",
    "cmake",
    "colorama",
    "contourpy",
    "coverage",
    "cuda-bindings",
    "cuda-core",
    "cuda-pathfinder",
    "cuda-toolkit",
    "cupy-cuda13x",
    "cycler",
    "cython",
    "diffrax",
    "e3nn",
    "einops",
    "equinox",
    "etils",
    "execnet",
    "filelock",
    "flatbuffers",
    "flax",
    "fonttools",
    "formulaic",
    "frozenlist",
    "fsspec",
    "gpytorch",
    "grpcio",
    "h11",
    "h5py",
    "hf-xet",
    "httpcore",
    "httpx",
    "huggingface-hub",
    "humanize",
    "hypothesis",
    "idna",
    "imageio",
    "iniconfig",
    "interface-meta",
    "jax",
    "jax-cuda13-pjrt",
    "jax-cuda13-plugin",
    "jaxlib",
    "jaxtyping",
    "jinja2",
    "joblib",
    "kiwisolver",
    "lazy-loader",
    "lightning",
    "lightning-utilities",
    "linear-operator",
    "lineax",
    "llvmlite",
    "lxml",
    "markdown",
    "markdown-it-py",
    "markupsafe",
    "matplotlib",
    "mdurl",
    "meson",
    "ml-dtypes",
    "mpi4py",
    "mpmath",
    "msgpack",
    "multidict",
    "multipledispatch",
    "mypy-extensions",
    "nanobind",
    "narwhals",
    "networkx",
    "ninja",
    "numba",
    "numba-cuda",
    "numpy",
    "numpyro",
    "nvidia-cublas",
    "nvidia-cuda-cupti",
    "nvidia-cuda-nvrtc",
    "nvidia-cuda-runtime",
    "nvidia-cudnn-cu13",
    "nvidia-cufft",
    "nvidia-cufile",
    "nvidia-curand",
    "nvidia-cusolver",
    "nvidia-cusparse",
    "nvidia-cusparselt-cu13",
    "nvidia-ml-py",
    "nvidia-nccl-cu13",
    "nvidia-nvjitlink",
    "nvidia-nvshmem-cu13",
    "nvidia-nvtx",
    "onnx",
    "onnx-ir",
    "onnxruntime",
    "onnxscript",
    "opencv-python-headless",
    "optax",
    "opt-einsum",
    "opt-einsum-fx",
    "optimistix",
    "orbax-checkpoint",
    "packaging",
    "pandas",
    "pathspec",
    "patsy",
    "peft",
    "pillow",
    "pip",
    "pluggy",
    "portalocker",
    "prometheus-client",
    "propcache",
    "protobuf",
    "psutil",
    "pyarrow",
    "pybind11",
    "py-cpuinfo",
    "pygments",
    "pyparsing",
    "pyproject-hooks",
    "pyre-extensions",
    "pytest",
    "pytest-benchmark",
    "pytest-cov",
    "pytest-mock",
    "pytest-timeout",
    "pytest-xdist",
    "python-dateutil",
    "pytorch-lightning",
    "pyyaml",
    "regex",
    "requests",
    "rich",
    "sacrebleu",
    "safetensors",
    "scikit-build-core",
    "scikit-image",
    "scikit-learn",
    "scipy",
    "seaborn",
    "sentencepiece",
    "sentence-transformers",
    "setuptools",
    "shellingham",
    "simplejson",
    "six",
    "sortedcontainers",
    "statsmodels",
    "sympy",
    "tabulate",
    "tensorboard",
    "tensorboard-data-server",
    "tensorstore",
    "threadpoolctl",
    "tifffile",
    "tiktoken",
    "timm",
    "tokenizers",
    "toolz",
    "torch",
    "torchaudio",
    "torchdiffeq",
    "torch-geometric",
    "torchmetrics",
    "torchvision",
    "tqdm",
    "transformers",
    "treescope",
    "triton",
    "typer",
    "typing-extensions",
    "typing-inspect",
    "urllib3",
    "uvloop",
    "wadler-lindig",
    "werkzeug",
    "wheel",
    "wrapt",
    "xarray",
    "xxhash",
    "yarl",
    "zipp",
}
ROOTS = ("sae-adaptive-plugin", "hatchling")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64")
PLATFORMS += ("manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_34_x86_64")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: tuple[str, ...]) -> dict[str, str]:
    """``{name: version}`` of the installed distributions ``roots`` need (no extras)."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = _norm(todo.pop())
        if name in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            print(f"note: {name} is not installed here; skipped", file=sys.stderr)
            continue
        found[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def uncovered(out: Path) -> list[str]:
    """Distributions that the check imports here (SAELens, its trainer, this package's check)
    and that neither the image nor a wheel in ``out`` provides."""
    import sae_lens  # noqa: F401
    from sae_lens.training.sae_trainer import SAETrainer  # noqa: F401

    from sae_adaptive_plugin.experiments import gpu_check

    gpu_check._ensure_registered()
    gpu_check._op_cases()
    provided = {_norm(n) for n in IMAGE_PACKAGES} | {"sae-adaptive-plugin"}
    provided |= {_norm(p.name.split("-")[0]) for p in out.glob("*.whl")}
    owners = md.packages_distributions()
    missing = set()
    for module in list(sys.modules):
        top = module.split(".")[0]
        if top.startswith("_") or top in sys.stdlib_module_names:
            continue
        missing |= {_norm(d) for d in owners.get(top, []) if _norm(d) not in provided}
    return sorted(missing)


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".whl")
    out.mkdir(exist_ok=True)
    image = {_norm(n) for n in IMAGE_PACKAGES}
    wanted = {
        n: v
        for n, v in closure(ROOTS).items()
        if n not in image and n != "sae-adaptive-plugin" and "+" not in v
    }
    missing: list[str] = []
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for name, version in sorted(wanted.items()):
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q"]
        cmd += ["--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
        cmd += ["--implementation", "cp", *platforms, "-d", str(out), f"{name}=={version}"]
        if subprocess.run(cmd).returncode != 0:  # e.g. an sdist-only package: left out
            missing.append(f"{name}=={version}")
    total = sum(p.stat().st_size for p in out.glob("*.whl"))
    print(f"{len(wanted) - len(missing)} wheels in {out} ({total / 2**20:.1f} MiB)")
    if missing:
        print(f"no CPython 3.12 wheel (left out): {', '.join(missing)}", file=sys.stderr)
    lacking = uncovered(out)
    if lacking:
        print(f"error: the check imports {', '.join(lacking)}, in no wheel", file=sys.stderr)
        return 1
    print("every distribution the check imports here is on the image or in a wheel")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
