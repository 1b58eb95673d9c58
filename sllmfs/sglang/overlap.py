"""The fast path copies the weights while SGLang builds the model.

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
- a call whose shape or dtype differs from the plan gets ordinary memory;
- after the build, a tensor counts as filled only if it still is its view; every other
  one is copied as before, and one that lies inside the block in the wrong place means
  the plan does not fit at all (the caller falls back);
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


def _shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
    size = kwargs.get("size", args[0] if len(args) == 1 and not isinstance(args[0], int) else args)
    return tuple(int(n) for n in size)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


class AllocationLog(TorchFunctionMode):
    """Numbers the build's torch.empty calls on ``device`` and marks their memory with a sentinel."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = _device_of({"device": device})
        self.calls: list[tuple[int, int]] = []  # (data_ptr, nbytes) per counted call

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _counted(func, kwargs, self.device):
            nbytes = out.numel() * out.element_size()
            if nbytes:
                _as_bytes(out).fill_(SENTINEL)
            self.calls.append((out.data_ptr(), nbytes))
        return out


@dataclass
class Candidates:
    """Right after a logged build: tensor name -> (call number, the tensor object, its address).

    Weak references: a weight that post-processing replaces must be freed as it would be without us."""

    by_name: dict[str, tuple[int, weakref.ref[torch.Tensor], int]] = field(default_factory=dict)


def _named_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    return chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))


def candidates(model: nn.Module, log: AllocationLog) -> Candidates:
    """The model's tensors that are a whole logged allocation the build did not write to."""
    latest: dict[int, int] = {}  # address -> call; a later call at one address means the earlier was freed
    for i, (ptr, nbytes) in enumerate(log.calls):
        if nbytes:
            latest[ptr] = i
    out = Candidates()
    for name, t in _named_tensors(model):
        i = latest.get(t.data_ptr(), -1) if t.numel() else -1
        if i < 0 or log.calls[i][1] != t.numel() * t.element_size() or not t.is_contiguous():
            continue
        if bool((_as_bytes(t) == SENTINEL).all()):
            out.by_name[name] = (i, weakref.ref(t), t.data_ptr())
    return out


def make_plan(cands: Candidates, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """After loading: the stored tensors that still are their build-time allocation, by call number."""
    now = dict(_named_tensors(model))
    plan = []
    for name, t in state.items():
        c = cands.by_name.get(name)
        if c is not None and c[1]() is not None and now.get(name) is c[1]() and t.data_ptr() == c[2]:
            plan.append([c[0], name])
    return {"version": PLAN_VERSION, "plan": sorted(plan)}


def read_plan(metadata: dict[str, Any], entries: Any) -> dict[int, str]:
    """Call number -> stored tensor name, from a variant's metadata; {} when it has no usable plan."""
    raw = metadata.get(PLAN_KEY)
    if not isinstance(raw, dict) or raw.get("version") != PLAN_VERSION:
        return {}
    out: dict[int, str] = {}
    for item in raw.get("plan", ()):
        if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], int) and item[1] in entries:
            out[item[0]] = item[1]
    return out


class Redirect(TorchFunctionMode):
    """Answers the planned torch.empty calls with views of the block being filled."""

    def __init__(self, device: torch.device, views: dict[int, torch.Tensor]):
        super().__init__()
        self.device = _device_of({"device": device})
        self.views = views
        self.calls = 0
        self.given = 0
        self.refused: list[int] = []  # planned calls whose shape or dtype differed

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if _counted(func, kwargs, self.device):
            i = self.calls
            self.calls += 1
            view = self.views.get(i)
            if view is not None:
                dtype = kwargs.get("dtype") or torch.get_default_dtype()
                if _shape(args, kwargs) == tuple(view.shape) and dtype == view.dtype:
                    self.given += 1
                    return view
                self.refused.append(i)
        return func(*args, **kwargs)


class _CallCount(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


def post_process(model: nn.Module, run: Callable[[Any, nn.Module], None]) -> list[str]:
    """Run each module's quant post-processing (``run(quant_method, module)``); the prefixes of the
    modules whose post-processing may have changed their tensors."""
    touched = []
    for name, module in model.named_modules():
        quant_method = getattr(module, "quant_method", None)
        if quant_method is None:
            continue
        with _CallCount() as count:
            run(quant_method, module)
        if count.calls or type(quant_method).__name__ not in QUIET_POST_PROCESS:
            touched.append(name)
    return touched


def under(name: str, prefixes: list[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


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
