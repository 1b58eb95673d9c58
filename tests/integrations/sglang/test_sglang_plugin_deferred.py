"""The SGLang plugin's load-phase hooks wait for SGLang's own import of the model runner: the
launching process, which never builds a model, does not import it for us (#21.4)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.sglang_env import require_sglang

require_sglang()

REPO = Path(__file__).resolve().parents[3]
PROBE = """
from tests.support.sglang_env import _torchvision_without_ops; _torchvision_without_ops()
import sys, types
import sglang.srt.server_args
from sglang.srt.plugins import load_plugins
load_plugins()  # what launch_server does first
from sglang.srt.server_args import LOAD_FORMAT_CHOICES
print("choices", "sllm" in LOAD_FORMAT_CHOICES)
print("runner imported", "sglang.srt.model_executor.model_runner" in sys.modules)
from sglang.srt.model_executor.model_runner import ModelRunner  # what a scheduler does when it builds its model
print("hooked", hasattr(ModelRunner.load_model, "__wrapped__"))
for fmt in ("auto", "sllm"):
    try:  # the original needs a real runner: only what the hooks do before it is looked at
        ModelRunner.load_model(types.SimpleNamespace(server_args=types.SimpleNamespace(load_format=fmt)))
    except AttributeError:
        pass
    print(fmt, "loader imported", "sllmfs.integrations.sglang.loader" in sys.modules)
"""


def _probe(tmp_path: Path, **env: str) -> list[str]:
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "SLLMFS_KERNEL_CACHE": "0", **env}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent(PROBE)], capture_output=True,
                          text=True, cwd=REPO, env=full, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sllmfs: warning" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


def test_load_phase_hooks_wait_for_sglangs_import_of_the_model_runner(tmp_path: Path) -> None:
    assert _probe(tmp_path) == ["choices True", "runner imported False", "hooked True",
                                "auto loader imported False", "sllm loader imported True"]


def test_the_load_phase_profile_still_wraps_the_loader_import(tmp_path: Path) -> None:
    out = _probe(tmp_path, SLLMFS_PROFILE_LOAD=str(tmp_path / "prof"))
    assert out[-1] == "sllm loader imported True"
    written = sorted(p.suffix for p in (tmp_path / "prof").iterdir())
    assert written == [".prof", ".txt"]  # load-<pid>: written even when the load fails


def test_the_launch_module_calls_the_hooked_prepare_server_args(tmp_path: Path) -> None:
    """``launch_server`` imported ``prepare_server_args`` by name before the plugins load: the hook is
    bound there too, so a start that cannot work ends at the command line with one line."""
    from sllmfs.ops.demo import build_model

    model = str(build_model(tmp_path / "m", "llama"))
    launch = ("from tests.support.sglang_env import import_sglang; import_sglang()\n"
              "from sllmfs.integrations.sglang import compat\n"
              "compat.installed_version = lambda: '0.5.99'  # a release sllmfs does not support\n"
              "import runpy; runpy.run_module('sglang.launch_server', run_name='__main__', alter_sys=True)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "SLLMFS_KERNEL_CACHE": "0"}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", launch, "--model-path", model, "--device", "cpu",
                           "--load-format", "sllm"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if "sllmfs" in line or "Traceback" in line]
    assert len(ours) == 1 and ours[0].startswith("sllmfs: --load-format sllm supports SGLang 0.5.17 to"), ours
