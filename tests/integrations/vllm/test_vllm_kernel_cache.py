"""The vLLM plugin serves kernel caches from the store (integrations/kernel_cache), in real vLLM 0.26.0:
the first process's ``load_general_plugins()`` points vLLM's cache root (its torch.compile cache, into
which vLLM points inductor and Triton while compiling) and Triton's cache at the working directory
keyed for vLLM, a worker process (which loads the plugins again) inherits them instead of
activating again, and what was compiled is published to the store at exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.vllm_env import require_vllm

require_vllm()

import vllm  # noqa: E402

from sllmfs.integrations import kernel_cache  # noqa: E402
from sllmfs.store import kernels  # noqa: E402
from sllmfs.store.store import Store  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
START = """
import json, os, subprocess, sys
from vllm.plugins import load_general_plugins
load_general_plugins()  # what vllm serve, LLM() and every worker call first: register() activates here
names = ["SLLMFS_KERNEL_CACHE_DIR", "TRITON_CACHE_DIR", "VLLM_CACHE_ROOT"]
mine = {n: os.environ.get(n) for n in names}
import vllm.envs
assert vllm.envs.VLLM_CACHE_ROOT == mine["VLLM_CACHE_ROOT"]  # where vLLM itself now caches
graph = os.path.join(mine["VLLM_CACHE_ROOT"], "torch_compile_cache", "h1", "rank_0_0")
os.makedirs(graph)
open(os.path.join(graph, "model.py"), "wb").write(b"compiled graph")
open(os.path.join(mine["TRITON_CACHE_DIR"], "k.cubin"), "wb").write(b"compiled")
worker = ("import json, os; from vllm.plugins import load_general_plugins; load_general_plugins()\\n"
          f"print(json.dumps({{n: os.environ.get(n) for n in {names!r}}}))")
theirs = json.loads(subprocess.run([sys.executable, "-c", worker], check=True, capture_output=True,
                                   text=True).stdout.splitlines()[-1])
print(json.dumps({"mine": mine, "theirs": theirs}))
"""


def test_plugin_points_the_caches_at_the_store_once_per_start(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    drop = {kernel_cache.MARK, kernel_cache.SWITCH, "VLLM_CACHE_ROOT"}
    drop |= {v for v, _ in kernel_cache.CACHE_VARS.values()}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=str(REPO), SLLMFS_STORAGE_PATH=str(store.root), TMPDIR=str(tmp_path),
               VLLM_LOGGING_LEVEL="ERROR")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(START)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sllmfs: warning" not in proc.stderr, proc.stderr
    seen = json.loads(proc.stdout.splitlines()[-1])
    mine, theirs = seen["mine"], seen["theirs"]
    work = mine["SLLMFS_KERNEL_CACHE_DIR"]
    assert work and Path(work).parent == tmp_path / f"sllmfs-kernels-{os.getuid()}"
    assert mine["TRITON_CACHE_DIR"] == f"{work}/triton" and mine["VLLM_CACHE_ROOT"] == f"{work}/vllm"
    assert theirs == mine  # the worker uses the same directories
    [entry], _ = kernels.entries(store)  # published at exit
    assert entry.key.startswith(f"vllm-{vllm.__version__}-")
    assert sorted(f.path for f in entry.files) == ["triton/k.cubin", "vllm/torch_compile_cache/h1/rank_0_0/model.py"]
    # a fresh node: its working directory is empty, the next start restores both from the store
    import shutil

    shutil.rmtree(work)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(RESTORED)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["compiled", "graph", "compiled"]


RESTORED = """
import os, subprocess, sys
from vllm.plugins import load_general_plugins
load_general_plugins()  # the launcher: the restore runs beside it
# the engine core, a process of its own that compiles: it loads the plugins first, which wait for the restore
core = '''
import os
from vllm.plugins import load_general_plugins
load_general_plugins()
root, triton = os.environ["VLLM_CACHE_ROOT"], os.environ["TRITON_CACHE_DIR"]
print(open(os.path.join(root, "torch_compile_cache", "h1", "rank_0_0", "model.py")).read())
print(open(os.path.join(triton, "k.cubin")).read())
'''
subprocess.run([sys.executable, "-c", core], check=True)
"""
