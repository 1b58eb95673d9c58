"""The fast path copies the weights while the framework (SGLang today) builds the model.

SGLang builds a model by allocating its parameters with ``torch.empty``, in an order
fixed by the model, the rank's layout and the SGLang version (all in the variant key).
The any-TP path logs those calls (:class:`AllocationLog`); write-back stores which call
became which stored tensor (the *plan*, in the variant's metadata). The fast path then
lays the planned tensors out in one block as the store lays their bytes, starts the copy
into it, and builds the model with those calls answered by views of the block
(:class:`Redirect`). The build is not timed against the copy any more: it runs beside it.

What keeps this from ever filling a model wrongly:
- a call is planned only if the build left its memory untouched (a sentinel the any-TP
  path writes into every logged allocation), so the build cannot race the copy;
- the plan keeps the shape and dtype of every logged call: from the first call that
  differs (another build), no more views are handed out;
- after the build, a tensor counts as filled only if it still is its view; every other
  one is copied as before, and any parameter or buffer that lies inside the block other
  than as its own view means the plan does not fit at all (the caller falls back);
- tensors of modules whose post-processing did anything are copied again afterwards.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

PLAN_KEY = "allocations"  # in the per-rank variant's manifest metadata
PLAN_VERSION = 1
SENTINEL = 0xA5  # written into each logged allocation; still there after the build = untouched
# post-processing known to leave the weights alone on CUDA (anything else is assumed to change them)
QUIET_POST_PROCESS = {"UnquantizedLinearMethod", "UnquantizedEmbeddingMethod"}


def _device_of(kwargs: dict[str, Any]) -> torch.device:
    """The device a factory call allocates on (an index-less cuda device is the current one)."""
    dev = kwargs.get("device")
    dev = torch.device(dev) if dev is not None else torch.get_default_device()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _counted(func: Any, kwargs: dict[str, Any], device: torch.device) -> bool:
    """The calls both modes number: plain torch.empty on the target device."""
    if func is not torch.empty or kwargs.get("out") is not None or kwargs.get("requires_grad"):
        return False
    if kwargs.get("memory_format") not in (None, torch.contiguous_format):
        return False
    return _device_of(kwargs) == device


def resolve(device: torch.device) -> torch.device:
    return _device_of({"device": device})


def _shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    """The requested size, or None when it is given in a form not planned for (the call gets its own memory)."""
    size = kwargs.get("size", args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args)
    if not isinstance(size, (tuple, list, torch.Size)) or not all(type(n) is int for n in size):
        return None
    return tuple(size)


def _fingerprint(shape: Any, dtype: torch.dtype) -> list[Any]:
    return [str(dtype).removeprefix("torch."), *shape]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


class AllocationLog(TorchFunctionMode):
    """Numbers the build's torch.empty calls on ``device`` and marks their memory with a sentinel."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = resolve(device)
        self.calls: list[tuple[int, int]] = []  # (data_ptr, nbytes) per counted call
        self.build: list[list[Any]] = []  # (dtype, *shape) per counted call: what the plan must meet again

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _counted(func, kwargs, self.device):
            nbytes = out.numel() * out.element_size()
            if nbytes:
                _as_bytes(out).fill_(SENTINEL)
            self.calls.append((out.data_ptr(), nbytes))
            self.build.append(_fingerprint(out.shape, out.dtype))
        return out


@dataclass
class Candidates:
    """Right after a logged build: tensor name -> (call number, the tensor object, its address).

    Weak references: a weight that post-processing replaces must be freed as it would be without us."""

    by_name: dict[str, tuple[int, weakref.ref[torch.Tensor], int]] = field(default_factory=dict)
    build: list[list[Any]] = field(default_factory=list)


def _named_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    return chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))


def candidates(model: nn.Module, log: AllocationLog) -> Candidates:
    """The model's tensors that are a whole logged allocation the build did not write to."""
    latest: dict[int, int] = {}  # address -> call; a later call at one address means the earlier was freed
    for i, (ptr, nbytes) in enumerate(log.calls):
        if nbytes:
            latest[ptr] = i
    out = Candidates(build=log.build)
    for name, t in _named_tensors(model):
        i = latest.get(t.data_ptr(), -1) if t.numel() else -1
        if i < 0 or log.calls[i][1] != t.numel() * t.element_size() or not t.is_contiguous():
            continue
        if _untouched(t):
            out.by_name[name] = (i, weakref.ref(t), t.data_ptr())
    return out


def _untouched(t: torch.Tensor, piece: int = 64 << 20) -> bool:
    raw = _as_bytes(t)
    return all(bool((raw[at : at + piece] == SENTINEL).all()) for at in range(0, raw.numel(), piece))


def make_plan(cands: Candidates, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """After loading: the stored tensors that still are their build-time allocation, by call number."""
    now = dict(_named_tensors(model))
    plan = []
    for name, t in state.items():
        c = cands.by_name.get(name)
        if c is not None and c[1]() is not None and now.get(name) is c[1]() and t.data_ptr() == c[2]:
            plan.append([c[0], name])
    return {"version": PLAN_VERSION, "plan": sorted(plan), "build": cands.build}


@dataclass
class Plan:
    views: dict[int, str]  # call number -> stored tensor name
    build: list[list[Any]]  # (dtype, *shape) of every counted call of the recorded build


def read_plan(metadata: dict[str, Any], entries: Any) -> Plan | None:
    """The allocation plan in a variant's metadata; None when it has none this sllmfs can use."""
    raw = metadata.get(PLAN_KEY)
    if not isinstance(raw, dict) or raw.get("version") != PLAN_VERSION:
        return None
    if not isinstance(raw.get("build"), (list, tuple)):  # msgpack from the sidecar gives tuples
        return None
    build = [list(c) for c in raw["build"] if isinstance(c, (list, tuple))]
    views: dict[int, str] = {}
    for item in raw.get("plan", ()):
        ok = isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], int)
        if ok and 0 <= item[0] < len(build) and item[1] in entries and item[1] not in views.values():
            views[item[0]] = item[1]
    return Plan(views, build) if views and len(build) == len(raw["build"]) else None


class Redirect(TorchFunctionMode):
    """Answers the planned torch.empty calls with views of the block being filled, while the build's
    calls match the recorded ones (shape and dtype, call by call)."""

    def __init__(self, device: torch.device, plan: Plan, views: dict[int, torch.Tensor]):
        super().__init__()
        self.device = resolve(device)
        self.build = plan.build
        self.views = views
        self.calls = 0
        self.diverged_at: int | None = None  # first call unlike the recorded build

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if _counted(func, kwargs, self.device):
            i = self.calls
            self.calls += 1
            if self.diverged_at is None:
                shape = _shape(args, kwargs)
                dtype = kwargs.get("dtype") or torch.get_default_dtype()
                if shape is None or i >= len(self.build) or _fingerprint(shape, dtype) != self.build[i]:
                    self.diverged_at = i
                elif i in self.views and tuple(self.views[i].shape) == shape and self.views[i].dtype == dtype:
                    view = self.views[i]
                    return view.view(view.shape)  # a tensor of its own: the build may rebind it freely
        return func(*args, **kwargs)

    @property
    def same_build(self) -> bool:
        return self.diverged_at is None and self.calls == len(self.build)


class _CallCount(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


def post_process(model: nn.Module, run: Callable[[Any, nn.Module], None]) -> set[int]:
    """Run each module's quant post-processing (``run(quant_method, module)``); the addresses of the
    tensors of every module whose post-processing may have changed them (by address: a module
    shared under two names is one module)."""
    touched: set[int] = set()
    for _name, module in model.named_modules():
        quant_method = getattr(module, "quant_method", None)
        if quant_method is None:
            continue
        with _CallCount() as count:
            run(quant_method, module)
        if count.calls or type(quant_method).__name__ not in QUIET_POST_PROCESS:
            touched.update(t.data_ptr() for t in chain(module.parameters(), module.buffers()) if t.numel())
    return touched


class Background:
    """Runs ``fn`` on a thread; :meth:`join` returns its result or raises its error."""

    def __init__(self, fn: Callable[[], Any], device: torch.device):
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, device), name="sllmfs-overlap-copy",
                                        daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any], device: torch.device) -> None:
        try:
            if device.type == "cuda":  # a new thread starts on device 0
                with torch.cuda.device(device):
                    self._result = fn()
            else:
                self._result = fn()
        except BaseException as e:  # handed to join()
            self._error = e

    def join(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result

    def join_quietly(self) -> None:
        """Wait for the thread (also past a Ctrl-C), dropping its error: on a path already failing."""
        while self._thread.is_alive():
            try:
                self._thread.join()
            except BaseException:  # noqa: S110 - keep waiting: the copy writes into memory we would free
                pass
