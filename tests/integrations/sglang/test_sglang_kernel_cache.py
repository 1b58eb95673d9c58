"""The SGLang plugin serves kernel caches from the store (#21), against the real SGLang 0.5.17 package.

Needs SGLang importable: run .ci/install-sglang.sh, then .venv-sglang/bin/python -m pytest.
Skips otherwise (fails instead when SLLMFS_REQUIRE_SGLANG=1, as in CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.sglang_env import require_sglang

require_sglang()

from sllmfs.integrations import kernel_cache  # noqa: E402
from sllmfs.integrations.sglang import compat  # noqa: E402
from sllmfs.store import kernels  # noqa: E402
from sllmfs.store.store import Store  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
START = """
from tests.support.sglang_env import import_sglang; import_sglang()
import json, os, subprocess, sys
from sglang.srt.plugins import load_plugins
load_plugins()  # what launch_server and Engine call first: the plugin's register() activates here
names = ["SLLMFS_KERNEL_CACHE_DIR", "TRITON_CACHE_DIR", "TVM_FFI_CACHE_DIR", "FLASHINFER_WORKSPACE_BASE",
         "TORCHINDUCTOR_CACHE_DIR"]
mine = {n: os.environ.get(n) for n in names}
open(os.path.join(mine["TRITON_CACHE_DIR"], "k.cubin"), "wb").write(b"compiled")
# a scheduler process: loads the plugins again, inherits the directories, does not activate again
worker = ("from tests.support.sglang_env import import_sglang; import_sglang()\\n"
          "import json, os; from sglang.srt.plugins import load_plugins; load_plugins()\\n"
          f"print(json.dumps({{n: os.environ.get(n) for n in {names!r}}}))")
theirs = json.loads(subprocess.run([sys.executable, "-c", worker], check=True, capture_output=True,
                                   text=True).stdout.splitlines()[-1])
print(json.dumps({"mine": mine, "theirs": theirs}))
"""


def _start(store: Path, **env: str) -> dict[str, dict[str, str | None]]:
    drop = {kernel_cache.MARK, kernel_cache.SWITCH} | {v for v, _ in kernel_cache.CACHE_VARS.values()}
    full = {k: v for k, v in os.environ.items() if k not in drop}
    full.update(PYTHONPATH=str(REPO), SLLMFS_STORAGE_PATH=str(store), TMPDIR=str(store.parent), **env)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(START)], capture_output=True, text=True,
                          cwd=REPO, env=full, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sllmfs: warning" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_register_points_the_caches_at_the_store_once_per_start(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    seen = _start(store.root, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "user-inductor"))
    mine, theirs = seen["mine"], seen["theirs"]
    work = mine["SLLMFS_KERNEL_CACHE_DIR"]
    assert work and Path(work).parent == tmp_path / f"sllmfs-kernels-{os.getuid()}"
    assert mine["TRITON_CACHE_DIR"] == f"{work}/triton" and mine["TVM_FFI_CACHE_DIR"] == f"{work}/tvm-ffi"
    assert mine["FLASHINFER_WORKSPACE_BASE"] == f"{work}/flashinfer"
    assert mine["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "user-inductor")  # the user's setting stays
    assert theirs == mine  # the scheduler process uses the same directories
    [entry], _ = kernels.entries(store)  # published at exit
    assert entry.key.startswith(f"sglang-{compat.installed_version()}-")
    assert [f.path for f in entry.files] == ["triton/k.cubin"]
