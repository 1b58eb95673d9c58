"""One rank of a TP>1 vLLM load on the CPU (run by test_vllm_tp.py, one process per rank):
vLLM's parallel state over gloo, then the same model filled three ways, by vLLM's DefaultModelLoader,
by ``--load-format sllm``'s any-TP path with write-back, by its fast path; prints one RESULT line.

    python -m tests.integrations.vllm.tp_rank RANK WORLD INIT_URL CHECKPOINT STORE MODEL
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any


def main(rank: int, world: int, init: str, checkpoint: str, store: str, model: str) -> None:
    from tests.support.vllm_env import cpu_platform, vllm_config

    cpu_platform()
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps
    from vllm.model_executor.model_loader import get_model_loader

    from sllmfs.integrations.vllm import plugin

    plugin.register()

    def config(load_format: str, extra: dict[str, Any] | None = None) -> Any:
        vc = vllm_config(checkpoint, load_format, extra)
        vc.parallel_config.tensor_parallel_size = world
        return vc

    with set_current_vllm_config(config("safetensors")):
        ps.init_distributed_environment(world_size=world, rank=rank, local_rank=rank, backend="gloo",
                                        distributed_init_method=init)
        ps.initialize_model_parallel(world, 1)

    def load(load_format: str, extra: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        vc = config(load_format, extra)
        with set_current_vllm_config(vc):
            loader = get_model_loader(vc.load_config)
            m = loader.load_model(vllm_config=vc, model_config=vc.model_config)
        return loader, {k: v.detach().clone() for k, v in m.state_dict().items()}

    def digest(state: dict[str, Any]) -> str:
        import torch

        h = hashlib.sha256()
        for name, t in sorted(state.items()):
            h.update(name.encode() + str(t.dtype).encode() + str(list(t.shape)).encode())
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    _, default = load("safetensors")
    extra = {"sllm_model": model, "sllm_storage_path": store, "sllm_write_back": "sync"}
    first, any_tp = load("sllm", extra)
    second, fast = load("sllm", extra)
    wb = first.write_back
    print("RESULT " + json.dumps({
        "rank": rank, "qkv_shape": list(default["model.layers.0.self_attn.qkv_proj.weight"].shape),
        "paths": [first.path_taken, second.path_taken], "write_back_error": None if wb is None else wb.error,
        "default": digest(default), "any_tp": digest(any_tp), "fast": digest(fast)}, default=str), flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), a[2], a[3], a[4], a[5])
