"""transformers load API: build the model on the meta device, fill it from the sidecar.

    from sllmfs.integrations.transformers import load_model, save_model
    save_model(model, "org/model", tokenizer=tok)           # into the store
    model = load_model("org/model", device_map="cuda")       # through the sidecar
    model = load_lora(model, "org/model", "chat")            # a LoRA adapter saved beside it
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from sllmfs.client.client import Client, connect
from sllmfs.client.transfer import copy_into, sidecar_copies
from sllmfs.core import names
from sllmfs.core.errors import BadInput
from sllmfs.core.scratch import scratch_dir
from sllmfs.engine.ipc import large_pool_bytes, reserve_segment
from sllmfs.integrations.torch import DeviceMap, _device_for
from sllmfs.store.save import save_model as save_checkpoint
from sllmfs.store.store import open_store


def save_model(model: Any, name: str, *, tokenizer: Any = None, storage_path: str | None = None,
               force: bool = False) -> None:
    """Save a transformers model (and its tokenizer) into the store as ``name``."""
    with scratch_dir("sllmfs-save-") as tmp:
        model.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_checkpoint(open_store(storage_path, write=True), name, Path(tmp), force=force)


def fetch_files(client: Client, model: str, variant: str, into: Path) -> Path:
    """Write the model's metadata files (config, tokenizer, ...) into ``into`` and return it."""
    for rel, data in client.files(model, variant).items():
        dest = into / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    return into


def _materialize(model: torch.nn.Module, device_map: DeviceMap, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Give every meta parameter real (uninitialized) memory on its device; return name → tensor."""
    targets: dict[str, torch.Tensor] = {}
    sizes: dict[torch.device, list[int]] = {}  # each GPU's parameters in one allocation: one IPC handle
    for name, p in model.named_parameters():
        dev = torch.device(_device_for(name, device_map))
        sizes.setdefault(dev, []).append(p.numel() * (dtype or p.dtype).itemsize)
    for dev, ns in sizes.items():
        reserve_segment(dev, large_pool_bytes(ns))
    for mod_name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            full = f"{mod_name}.{pname}" if mod_name else pname
            dev = _device_for(full, device_map)
            real = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype or p.dtype, device=dev), requires_grad=False)
            setattr(module, pname, real)
            targets[full] = real.data
        for bname, b in list(module.named_buffers(recurse=False)):
            full = f"{mod_name}.{bname}" if mod_name else bname
            module._buffers[bname] = b.to(_device_for(full, device_map))
    return targets


def load_model(name: str, device_map: DeviceMap = "cuda", torch_dtype: torch.dtype | str | None = None, *,
               socket: str | None = None, timeout: float = 120.0, return_stats: bool = False,
               files_dir: Path | None = None) -> Any:
    """Build ``name``'s architecture on the meta device and fill it through the copy engine.

    ``files_dir``: the model's metadata files already fetched (:func:`fetch_files`); else fetched here."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    names.check_model_name(name)
    dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    t0 = time.perf_counter()
    with connect(socket) as client, scratch_dir("sllmfs-meta-") as tmp:
        config = AutoConfig.from_pretrained(files_dir or fetch_files(client, name, names.HF_VARIANT, Path(tmp)))
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary) computed
            model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None))
        targets = _materialize(model, device_map, dtype)
        gpu_first = sidecar_copies() and any(t.is_cuda for t in targets.values())
        with client.acquire(name, names.HF_VARIANT, gpu_first=gpu_first) as lease:
            stored = set(lease.entries)
            tied = [n for n in targets if n not in stored]
            absent_ok = _tied_names(model)
            really_missing = [n for n in tied if n not in absent_ok]
            if really_missing:
                raise BadInput(f"model {name!r} has no stored tensor {really_missing[0]!r} that "
                               f"{type(model).__name__} needs; was it saved from another architecture?")
            stats = copy_into(lease, {n: t for n, t in targets.items() if n in stored}, timeout=timeout,
                              strict=False)
    model.tie_weights()
    model.eval()
    stats.seconds = time.perf_counter() - t0
    return (model, stats) if return_stats else model


def _tied_names(model: Any) -> set[str]:
    return set(getattr(model, "_tied_weights_keys", None) or [])  # a list, or a dict keyed by the tied name


def load_lora(model: Any, base: str, adapter_name: str, *, socket: str | None = None,
              timeout: float = 120.0) -> Any:
    """Wrap ``model`` with the LoRA adapter stored beside ``base`` and fill its weights."""
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict

    variant = names.adapter_variant(adapter_name)
    with connect(socket) as client, scratch_dir("sllmfs-lora-") as tmp:
        cfg = LoraConfig.from_pretrained(str(fetch_files(client, base, variant, Path(tmp))))
        peft_model = PeftModel(model, cfg)
        with client.acquire(base, variant) as lease:
            device = next(model.parameters()).device
            weights = {n: t.to(device, copy=True) for n, t in lease.tensors(timeout=timeout).items()}
        set_peft_model_state_dict(peft_model, weights)
    peft_model.eval()
    return peft_model
