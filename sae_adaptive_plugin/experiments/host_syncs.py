"""Where a piece of torch code would wait for the GPU: host-sync events, counted on any device.

:class:`HostSyncCounter` records, while it is active, every call that on CUDA makes the host wait
for the device, with the file:line of the innermost caller outside torch:

- ``scalar read``: ``item()``, ``bool()``/``float()``/``int()`` of a tensor (``_local_scalar_dense``);
- ``data-dependent shape``: ``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
  ``repeat_interleave`` without ``output_size``;
- ``host copy``: ``tolist()``, ``numpy()``, ``cpu()``;
- ``tensor without a device``: a factory (``torch.zeros``, ``torch.tensor``, ...) given no
  ``device``, which lands on the CPU and must be copied to, or read by, a CUDA kernel.

On CPU these are recorded by a dispatch mode (forward and backward) and a function mode (forward),
so a test without a GPU catches a new sync. Host tensors are not counted: those made with the
literal ``device="cpu"`` (on purpose, whatever the model's device) and what is computed from them
alone. With ``cuda=True`` the counter also turns on
``torch.cuda.set_sync_debug_mode("warn")`` and counts the warnings it raises (:attr:`cuda_syncs`).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

_TORCH_DIR = str(Path(torch.__file__).parent)
_THIS_FILE = str(Path(__file__))

_SCALAR_READS = {"_local_scalar_dense"}
_DATA_DEPENDENT = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim"}
_DATA_DEPENDENT |= {"unique_consecutive"}
_HOST_COPIES = {"tolist", "numpy", "cpu"}
_FACTORIES = {
    "zeros",
    "ones",
    "empty",
    "full",
    "tensor",
    "arange",
    "linspace",
    "rand",
    "randn",
    "randint",
    "randperm",
    "scalar_tensor",
    "eye",
}


_TORCH_MODULES = ("torch", "torch._C._VariableFunctions")


@dataclass(frozen=True)
class HostSync:
    """One recorded call: its kind (module docstring), the op and the caller's ``file:line``."""

    kind: str
    op: str
    where: str


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_TORCH_DIR) and path != _THIS_FILE:
            return f"{path}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _has_bool_index(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class _DispatchRecorder(TorchDispatchMode):
    def __init__(self, events: list[HostSync], host: WeakIdKeyDictionary):
        super().__init__()
        self.events = events
        self.host = host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        inputs = _tensors((args, kwargs))
        on_host = bool(inputs) and all(t in self.host for t in inputs)
        out = func(*args, **(kwargs or {}))
        if on_host:
            for t in _tensors(out):
                self.host[t] = True
            return out
        if name in _SCALAR_READS:
            self.events.append(HostSync("scalar read", name, _caller()))
        elif name in _DATA_DEPENDENT or (
            name == "repeat_interleave"
            and isinstance(args[0], torch.Tensor)
            and (kwargs or {}).get("output_size") is None
        ):
            self.events.append(HostSync("data-dependent shape", name, _caller()))
        elif name in ("index", "index_put", "index_put_") and _has_bool_index(args[1]):
            self.events.append(
                HostSync("data-dependent shape", f"{name} (boolean mask)", _caller())
            )
        return out


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self, events: list[HostSync], host: WeakIdKeyDictionary):
        super().__init__()
        self.events = events
        self.host = host

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        out = func(*args, **kwargs)
        if name in _HOST_COPIES and args and isinstance(args[0], torch.Tensor):
            if args[0] not in self.host:
                self.events.append(HostSync("host copy", name, _caller()))
            if isinstance(out, torch.Tensor):  # cpu(): what comes back is on the host
                self.host[out] = True
        elif name in _FACTORIES and getattr(func, "__module__", None) in _TORCH_MODULES:
            device = kwargs.get("device")
            if device is None:
                self.events.append(HostSync("tensor without a device", name, _caller()))
            elif device == "cpu" and isinstance(out, torch.Tensor):  # the literal: on purpose
                self.host[out] = True
        return out


class HostSyncCounter:
    """Context manager recording :class:`HostSync` events (and, with ``cuda``, the CUDA
    sync-debug warnings) of the code it wraps; see the module docstring. ``host``: tensors made
    before it that live on the CPU by design (not counted, nor what is computed from them)."""

    def __init__(self, cuda: bool = False, host: Iterable[Any] = ()):
        self.cuda = cuda
        self.host = [t for t in host if isinstance(t, torch.Tensor)]
        self.events: list[HostSync] = []
        self.cuda_syncs = 0
        self.cuda_messages: list[str] = []

    def __enter__(self) -> HostSyncCounter:
        host = WeakIdKeyDictionary()
        for t in self.host:
            host[t] = True
        self._modes = [_FunctionRecorder(self.events, host), _DispatchRecorder(self.events, host)]
        for mode in self._modes:
            mode.__enter__()
        if self.cuda:
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            self._before = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode(self._before)
            self._warnings.__exit__(*exc)
            syncs = [w for w in self._caught if "synchronizing CUDA operation" in str(w.message)]
            self.cuda_messages = [str(w.message) for w in syncs]
            self.cuda_syncs = len(syncs)
            for w in self._caught:  # the code's other warnings go on as usual
                if w not in syncs:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def where(self, inside: str = "sae_adaptive_plugin") -> list[HostSync]:
        """The events whose caller's path contains ``inside``."""
        return [e for e in self.events if inside in e.where]


#: The training steps :func:`warmed_up_step` builds: each architecture after its warm-up, plus
#: AdaptiveK's labelling step (second half of its warm-up) and SoftSAE's plain soft phase.
STEP_CASES = (
    "topk",
    "hierarchical_topk",
    "adaptivek",
    "adaptivek_labelling",
    "softsae_soft",
    "softsae_soft_plain",
    "softsae_hard",
)


@contextlib.contextmanager
def reads_as_on_a_gpu() -> Iterator[None]:
    """Inside, the package takes the paths it takes on a GPU: the value reads it makes only where
    they are free (``ops.dispatch.host_check_is_free``: on the CPU, outside ``torch.compile``) are
    switched off in every loaded module that uses them, so a CPU run counts a GPU's syncs."""
    from sae_adaptive_plugin.ops import dispatch

    original = dispatch.host_check_is_free
    modules = [
        module
        for name, module in list(sys.modules.items())
        if name.startswith("sae_adaptive_plugin")
        and getattr(module, "host_check_is_free", None) is original
    ]
    for module in modules:
        module.host_check_is_free = lambda _t: False  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module in modules:
            module.host_check_is_free = original  # type: ignore[attr-defined]


def warmed_up_step(
    case: str, d_in: int, d_sae: int, k: int, device: str = "cpu", dtype: str = "float32"
) -> Callable[[torch.Tensor, torch.Tensor | None], Any]:
    """A training SAE of ``case`` (:data:`STEP_CASES`) taken through its warm-up on a seeded
    batch; returns ``step(x, dead_mask)``: one ``training_forward_pass`` + backward at the step
    the case names (what :class:`HostSyncCounter` should wrap)."""
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import TrainStepInput

    from sae_adaptive_plugin.probe import ComplexityProbe

    if case not in STEP_CASES:
        raise ValueError(f"case must be one of {STEP_CASES}, got {case!r}")
    base = {"d_in": d_in, "d_sae": d_sae, "device": device, "dtype": dtype}
    soft = {"k": k, "k_max": 2 * k, "k_anneal_steps": 2, "alpha_anneal_steps": 2}
    # architecture, config fields, the counted step
    settings: dict[str, tuple[str, dict[str, Any], int]] = {
        "topk": ("topk", {"k": k}, 2),
        "hierarchical_topk": ("hierarchical_topk", {"k": k}, 2),
        "adaptivek": ("adaptivek", {"k": k, "probe_warmup_steps": 4}, 2),
        "adaptivek_labelling": ("adaptivek", {"k": k, "probe_warmup_steps": 1000}, 502),
        "softsae_soft": ("softsae", {**soft, "hard_topk_start_step": 100}, 5),
        "softsae_soft_plain": ("softsae", {**soft, "hard_topk_start_step": 100}, 5),
        "softsae_hard": ("softsae", {**soft, "hard_topk_start_step": 3}, 5),
    }
    arch, fields, counted = settings[case]
    sae_class, cfg_class = get_sae_training_class(arch)
    sae = sae_class(cfg_class(**fields, **base))
    if case == "softsae_soft_plain":
        sae.fused_soft = False
    if hasattr(sae, "bind_run_length"):
        sae.bind_run_length(10_000)
    if case == "adaptivek":  # a probe loaded from a fitted SAE's state (the flag follows it)
        fitted = sae_class(cfg_class(**fields, **base))
        gen = torch.Generator().manual_seed(1)
        weight = torch.randn(d_in, generator=gen) / d_in**0.5
        fitted.set_probe(ComplexityProbe(weight, 0.0, -2.0, 2.0))
        sae.load_state_dict(fitted.state_dict())
    gen = torch.Generator().manual_seed(0)
    x_warm = torch.randn(max(64, 4 * k), d_in, generator=gen).to(device, getattr(torch, dtype))

    def step(x: torch.Tensor, dead_mask: torch.Tensor | None, n: int = counted) -> Any:
        sae.zero_grad(set_to_none=True)
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={},
                dead_neuron_mask=dead_mask,
                n_training_steps=n,
                is_logging_step=False,
            )
        )
        out.loss.backward()
        return out

    warm_steps = {"adaptivek_labelling": [500, 501]}.get(case, range(counted))
    for n in warm_steps:
        step(x_warm, None, n)
    return step
