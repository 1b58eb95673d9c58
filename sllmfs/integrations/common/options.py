"""What every framework's ``--load-format sllm`` loader reads from its extra config, written once:
the keys, where the model and the sidecar are, and the weight source that follows."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sllmfs.core import names
from sllmfs.core.config import load_settings
from sllmfs.core.errors import BadInput
from sllmfs.integrations.common import writeback
from sllmfs.integrations.common.locate import Located, locate
from sllmfs.integrations.common.source import SidecarSource, StoreSource, WeightSource

# --model-loader-extra-config keys every loader reads (a framework may add its own)
COMMON_KEYS = {
    "sllm_write_back",  # true (default, in the background) | false | "sync"
    "sllm_socket",  # sidecar socket, else the mount's or $SLLMFS_SOCKET
    "sllm_model",  # store model name, when the model path is not under the mount
    "sllm_storage_path",  # read this store directly, no sidecar
}

SourceFactory = Callable[[Located], WeightSource]


def extra_config(raw: Mapping[str, Any] | None, known: set[str]) -> dict[str, Any]:
    """The loader's extra config, refusing keys it does not know (a typo must not be ignored)."""
    extra = dict(raw or {})
    unknown = sorted(set(extra) - known)
    if unknown:
        raise BadInput(f"--model-loader-extra-config key {unknown[0]!r} is unknown to --load-format sllm "
                       f"(known: {', '.join(sorted(known))})")
    return extra


def located(extra: Mapping[str, Any], model_path: str) -> Located:
    """The store model and sidecar for this start: named outright (``sllm_model``), else found from
    the model path under the mount; ``sllm_storage_path`` reads that store directly."""
    name, socket = extra.get("sllm_model"), extra.get("sllm_socket")
    if name:  # no path lookup (the model path may be the store's files/ folder)
        settings = load_settings()
        found = Located(names.check_model_name(str(name)), socket or settings.socket, None, settings.storage_path)
    else:
        found = locate(model_path, socket=socket)
    storage = extra.get("sllm_storage_path")
    return Located(found.model, found.socket, found.mount, str(storage)) if storage else found


def weight_source(extra: Mapping[str, Any], where: Located) -> WeightSource:
    if extra.get("sllm_storage_path"):
        return StoreSource(where.model, where.storage_path)
    return SidecarSource(where.model, where.socket)


class LoaderSettings:
    """What every ``--load-format sllm`` loader (SGLang's, vLLM's) keeps from its load config: a mixin
    beside the framework's own ``BaseModelLoader``."""

    extra: dict[str, Any]
    write_back_mode: str
    source_factory: SourceFactory
    write_back: writeback.WriteBack | None
    path_taken: str | None

    def _read_config(self, raw: Mapping[str, Any] | None, keys: set[str],
                     source_factory: SourceFactory | None) -> None:
        self.extra = extra_config(raw, keys)
        self.write_back_mode = writeback.mode(self.extra.get("sllm_write_back"))
        self.source_factory = source_factory or self._default_source
        self.write_back = None  # the last one started (tests, save)
        self.path_taken = None  # "fast" | "any-tp"

    def _default_source(self, where: Located) -> WeightSource:
        return weight_source(self.extra, where)
