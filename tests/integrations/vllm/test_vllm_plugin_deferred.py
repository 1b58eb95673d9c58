"""The vLLM plugin registers ``sllm`` once vLLM imports its model loaders, and what it registers
imports our loader only when a load uses it: vLLM's API server process imports neither (#21.4)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.support.vllm_env import require_vllm

require_vllm()  # (not importorskip("vllm"): pytest's rootdir puts tests/integrations on sys.path, where
#               tests/integrations/vllm/ itself imports as a namespace package named vllm)

PROBE = """
import sys
import vllm.engine.arg_utils
from vllm.plugins import load_general_plugins
load_general_plugins()  # what vllm serve does first, in its API server process
print("loaders imported", "vllm.model_executor.model_loader" in sys.modules)
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, get_model_loader  # the engine core
print("registered", "sllm" in _LOAD_FORMAT_TO_MODEL_LOADER)
print("ours imported", "sllmfs.integrations.vllm.loader" in sys.modules)
print(type(get_model_loader(LoadConfig(load_format="auto"))).__name__)
print("ours imported", "sllmfs.integrations.vllm.loader" in sys.modules)
print(type(get_model_loader(LoadConfig(load_format="sllm"))).__name__)
"""


def test_the_format_waits_for_vllms_loaders_and_our_loader_for_its_first_use() -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(PROBE)], capture_output=True, text=True,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "SLLMFS_KERNEL_CACHE": "0"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == ["loaders imported False", "registered True", "ours imported False",
                                                "DefaultModelLoader", "ours imported False", "SllmModelLoader"]
