"""What a kernel cache is valid for: the key of its entry in the store (``kernels.py``).

This module is on every start's path (the plugins compute the key before the engine compiles anything),
so it imports nothing heavy: the GPU facts come from the NVIDIA driver's /proc files, which answer in
well under a millisecond where NVML's import and init cost a start 30-40 ms on the H200 machines
(bench_plugin_cost.py, ``kernel_key``). NVML, then torch, answer where the driver has no /proc files.

The key holds the GPU model but not its compute capability: a model has one capability, so it would
name nothing new, and /proc does not show it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

PROC = Path("/proc/driver/nvidia")


@dataclass(frozen=True)
class KernelKey:
    """What a kernel cache is valid for; ``name`` is its entry's directory in the store."""

    gpu: str  # "NVIDIA H200" (several models: sorted, joined by "+"); "" without a GPU
    driver: str  # "570.86.15"
    cuda: str  # the CUDA runtime torch was built with, "12.8"
    torch: str
    triton: str
    framework: str  # "sglang 0.5.17"
    extras: tuple[tuple[str, str], ...] = ()  # kernel libraries present: (("flashinfer", "0.5.3"), ...)

    @property
    def name(self) -> str:
        """A readable slug plus a hash of every fact: ``sglang-0.5.17-h200-3f2a9c1b7d4e``."""
        facts = json.dumps(asdict(self), sort_keys=True).encode()
        gpu = re.sub(r"^nvidia-", "", _slug(self.gpu))[:24] or "cpu"
        return f"{_slug(self.framework)[:40] or 'engine'}-{gpu}-{hashlib.sha256(facts).hexdigest()[:12]}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")


def current(framework: str) -> KernelKey:
    """This process's key: GPU facts (the driver's /proc files, else NVML, else torch), versions from
    the installed distributions. ``framework`` is a distribution name ("sglang")."""
    gpu, driver = node_gpus(), proc_driver()
    if not (gpu and driver):
        gpu, driver = _asked_gpu_facts()
    extras = tuple((d, v) for d in ("flashinfer-python", "apache-tvm-ffi", "sgl-kernel") if (v := _version(d)))
    import torch  # the engine's own: imported already in every process that asks

    return KernelKey(gpu=gpu, driver=driver or proc_driver(), cuda=torch.version.cuda or "",
                     torch=torch.__version__, triton=_version("triton"),
                     framework=f"{framework} {_version(framework)}".strip(), extras=extras)


def node_gpus(proc: Path | None = None) -> str:
    """The node's GPU models as the driver names them ("NVIDIA H200"; several: sorted, joined by "+"),
    all those NVML lists (not the ones excluded from use), whatever CUDA_VISIBLE_DEVICES says; "" without
    the driver's files."""
    models = set()
    for info in (proc or PROC).glob("gpus/*/information"):
        try:
            fields = dict(line.split(":", 1) for line in info.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if "Model" in fields and fields.get("GPU Excluded", "No").strip() != "Yes":
            models.add(fields["Model"].strip())
    return "+".join(sorted(models))


def proc_driver(proc: Path | None = None) -> str:
    try:
        text = ((proc or PROC) / "version").read_text()
    except OSError:
        return ""
    m = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d[\d.]+)", text)
    return m.group(1) if m else ""


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


def _asked_gpu_facts() -> tuple[str, str]:
    """(GPU models, driver) from NVML where CUDA is not up yet (it creates no CUDA context and leaves a
    process free to fork), else from torch (the visible devices only; the driver from /proc)."""
    import torch

    if not torch.cuda.is_initialized():
        try:
            return _nvml_facts()
        except Exception:  # no pynvml, no driver: torch decides
            pass
    if not torch.cuda.is_available():
        return "", ""
    return "+".join(sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})), ""


def _nvml_facts() -> tuple[str, str]:
    import pynvml

    pynvml.nvmlInit()
    try:
        models = set()
        for i in range(pynvml.nvmlDeviceGetCount()):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
            models.add(name.decode() if isinstance(name, bytes) else name)
        driver = pynvml.nvmlSystemGetDriverVersion()
        return "+".join(sorted(models)), driver.decode() if isinstance(driver, bytes) else driver
    finally:
        pynvml.nvmlShutdown()
