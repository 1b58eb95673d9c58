"""The SGLang plugin and patch against the installed SGLang release (pure-Python parts, CPU).

Needs SGLang importable: run .ci/install-sglang.sh, then .venv-sglang/bin/python -m pytest.
Skips otherwise (fails instead when SLLMFS_REQUIRE_SGLANG=1, as in CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.support.sglang_env import require_sglang

require_sglang()

from sglang.srt.configs.load_config import LoadConfig, LoadFormat  # noqa: E402
from sglang.srt.model_loader.loader import get_model_loader  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402

from sllmfs.core.errors import BadInput, NotFound  # noqa: E402
from sllmfs.integrations.sglang import compat, patch, plugin  # noqa: E402
from sllmfs.integrations.sglang.loader import SllmModelLoader  # noqa: E402
from tests.support.cli import one_line_error  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def _python(code: str, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a fresh interpreter (plugins load once per process, as in SGLang)."""
    prelude = "from tests.support.sglang_env import import_sglang; import_sglang()\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def registered() -> None:
    plugin.register()
    HookRegistry.apply_hooks()


def test_entry_point_is_discoverable() -> None:
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "sllmfs"]
    assert len(eps) == 1 and eps[0].value == "sllmfs.integrations.sglang.plugin:register"
    assert eps[0].load() is plugin.register


def test_sglang_loads_the_plugin_in_a_fresh_process() -> None:
    out = _python("""
        from sglang.srt.plugins import load_plugins
        load_plugins()  # what launch_server, Engine and every scheduler process call
        from sglang.srt.server_args import LOAD_FORMAT_CHOICES
        from sglang.srt.configs.load_config import LoadConfig, LoadFormat
        from sglang.srt.model_loader import get_model_loader
        assert "sllm" in LOAD_FORMAT_CHOICES
        print(type(get_model_loader(LoadConfig(load_format="sllm"))).__name__)
        assert LoadConfig(load_format="safetensors").load_format is LoadFormat.SAFETENSORS
    """)
    assert out.split() == ["SllmModelLoader"]


def test_plugin_can_be_turned_off_by_sglang_plugins() -> None:
    out = _python("""
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.configs.load_config import LoadConfig
        try:
            LoadConfig(load_format="sllm")
        except ValueError:
            print("rejected")
    """, env={"SGLANG_PLUGINS": "someone-else"})
    assert out.split() == ["rejected"]


def test_register_accepts_sllm_everywhere(registered: None) -> None:
    import argparse

    from sglang.srt.server_args import LOAD_FORMAT_CHOICES, ServerArgs

    assert LOAD_FORMAT_CHOICES.count("sllm") == 1
    plugin.register()  # idempotent
    assert LOAD_FORMAT_CHOICES.count("sllm") == 1
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    assert parser.parse_args(["--model-path", "/mnt/sllm/m", "--load-format", "sllm"]).load_format == "sllm"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-path", "m", "--load-format", "nonsense"])
    cfg = LoadConfig(load_format="SLLM", model_loader_extra_config='{"sllm_write_back": false}')
    loader = get_model_loader(cfg)
    assert isinstance(loader, SllmModelLoader) and loader.write_back_mode == "off"
    assert LoadConfig(load_format="auto").load_format is LoadFormat.AUTO
    with pytest.raises(ValueError):
        LoadConfig(load_format="nonsense")


def test_unknown_extra_config_is_one_clear_error(registered: None) -> None:
    with pytest.raises(BadInput, match="'pattern' is unknown to --load-format sllm"):
        get_model_loader(LoadConfig(load_format="sllm", model_loader_extra_config={"pattern": "x"}))


# -- the patch ------------------------------------------------------------------

# the installed release's patch: LoadFormat, the --load-format choices (server_args.py up to 0.5.19,
# arg_groups/choices.py after), get_model_loader
PATCHED = [fp.path for fp in patch.parse(patch.patch_file(compat.installed_version()).read_text())]


@pytest.fixture
def sglang_copy(tmp_path: Path) -> Path:
    """The files the patch touches, copied with SGLang's dist-info (the version check reads it)."""
    site = patch.site_packages()
    root = tmp_path / "site"
    for rel in PATCHED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(site / rel, root / rel)
    dist = next(site.glob("sglang-*.dist-info"))
    shutil.copytree(dist, root / dist.name)
    return root


def test_patch_applies_checks_and_reverts(sglang_copy: Path) -> None:
    originals = {rel: (sglang_copy / rel).read_text() for rel in PATCHED}
    report = patch.check(sglang_copy)
    assert report.version == compat.installed_version() and report.state == patch.NOT_APPLIED
    assert patch.apply(sglang_copy).state == patch.APPLIED
    assert 'SLLM = "sllm"' in (sglang_copy / PATCHED[0]).read_text()
    assert patch.apply(sglang_copy).state == patch.APPLIED  # twice is harmless
    assert patch.apply(sglang_copy, reverse=True).state == patch.NOT_APPLIED
    assert {rel: (sglang_copy / rel).read_text() for rel in PATCHED} == originals


def test_patch_refuses_a_changed_file(sglang_copy: Path) -> None:
    f = sglang_copy / PATCHED[2]
    f.write_text(f.read_text().replace("return DummyModelLoader(load_config)", "return None"))
    assert patch.check(sglang_copy).state == patch.CONFLICT
    with pytest.raises(BadInput, match="does not match the patch"):
        patch.apply(sglang_copy)
    assert "LoadFormat.SLLM" not in f.read_text()  # nothing half-applied
    (sglang_copy / PATCHED[0]).unlink()
    with pytest.raises(NotFound, match="is missing"):
        patch.check(sglang_copy)


def sllmfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The real CLI; imports the command module in case sllmfs.cli does not list it yet."""
    code = "import sllmfs.cli.sglang_cmds; from sllmfs.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"sllmfs {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def test_patch_sglang_cli(sglang_copy: Path) -> None:
    site = ["--site-packages", str(sglang_copy)]
    proc = sllmfs("patch-sglang", "--check", *site, check=False)
    assert proc.returncode == 1 and "patch not applied" in proc.stdout
    assert "patch applied" in sllmfs("patch-sglang", *site).stdout
    assert sllmfs("patch-sglang", "--check", *site).returncode == 0
    assert "patch not applied" in sllmfs("patch-sglang", "--revert", *site).stdout
    (sglang_copy / PATCHED[1]).write_text("LOAD_FORMAT_CHOICES = []\n")
    assert "does not match the patch" in one_line_error(sllmfs("patch-sglang", *site, check=False))


def test_patched_sglang_needs_no_plugin(tmp_path: Path) -> None:
    """A patched copy of the whole package: sllm is a LoadFormat member and get_model_loader builds our loader."""
    site = patch.site_packages()
    root = tmp_path / "site"
    shutil.copytree(site / "sglang", root / "sglang", ignore=shutil.ignore_patterns("__pycache__"))
    assert patch.apply(root).state == patch.APPLIED
    code = """
        from sglang.srt.plugins import load_plugins
        load_plugins()
        import sglang
        from sglang.srt.configs.load_config import LoadConfig, LoadFormat
        from sglang.srt.model_loader.loader import get_model_loader
        from sglang.srt.server_args import LOAD_FORMAT_CHOICES
        cfg = LoadConfig(load_format="sllm")
        print(cfg.load_format is LoadFormat.SLLM, type(get_model_loader(cfg)).__name__,
              LOAD_FORMAT_CHOICES.count("sllm"), sglang.__file__.startswith(ROOT))
    """.replace("ROOT", repr(str(root)))
    out = _python(code, env={"PYTHONPATH": f"{root}{os.pathsep}{REPO}", "SGLANG_PLUGINS": "someone-else"})
    assert out.split() == ["True", "SllmModelLoader", "1", "True"]


def test_profile_env_wraps_the_load_phase(tmp_path: Path) -> None:
    out = _python(f"""
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.model_executor.model_runner import ModelRunner
        try:
            ModelRunner.load_model(object())  # not a runner: fails inside SGLang, after the profiler started
        except AttributeError:
            pass
        import os, pathlib
        text = pathlib.Path({str(tmp_path)!r}, f"load-{{os.getpid()}}.txt").read_text()
        print("load_model" in text, pathlib.Path({str(tmp_path)!r}, f"load-{{os.getpid()}}.prof").stat().st_size > 0)
    """, env={"SLLMFS_PROFILE_LOAD": str(tmp_path)})
    assert out.split() == ["True", "True"]


def test_loader_is_imported_before_the_load_phase_clock() -> None:
    out = _python("""
        import sys, types
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.model_executor.model_runner import ModelRunner
        for fmt in ("auto", "sllm"):
            runner = types.SimpleNamespace(server_args=types.SimpleNamespace(load_format=fmt))
            try:
                ModelRunner.load_model(runner)  # a stand-in runner: SGLang's body fails at once
            except AttributeError:
                pass
            print(fmt, "sllmfs.integrations.sglang.loader" in sys.modules)
    """)
    assert out.split() == ["auto", "False", "sllm", "True"]


# -- releases ----------------------------------------------------------------------


def test_supported_range() -> None:
    assert compat.is_supported(compat.installed_version())
    for version, ok in [("0.5.16", False), ("0.5.17", True), ("0.5.20", True), ("0.5.23", True),
                        ("0.5.23.post1", True), ("0.5.24rc1", False), ("0.5.24", False), ("0.6.0", False),
                        ("0.0.0.dev0", False), ("main", False)]:
        assert compat.is_supported(version) is ok, version
    problem = compat.version_problem("0.5.24")
    assert problem and "\n" not in problem and "SGLang 0.5.17 to 0.5.23" in problem and "0.5.24" in problem
    assert compat.version_problem("0.5.17") is None


def test_another_release_is_refused_with_one_line(tmp_path: Path) -> None:
    """As if SGLang 0.5.24 were installed: --load-format sllm is one line where the CLI builds its
    ServerArgs and where LoadConfig is built (Engine, schedulers); other load formats are untouched."""
    from sllmfs.ops.demo import build_model

    model = str(build_model(tmp_path / "m", "llama"))  # 0.5.17's ServerArgs reads its config.json
    out = _python("""
        import sglang.version
        sglang.version.__version__ = "0.5.24"
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.configs.load_config import LoadConfig
        from sglang.srt.server_args import prepare_server_args
        from sllmfs.core.errors import BadInput
        try:
            prepare_server_args(["--model-path", MODEL, "--device", "cpu", "--load-format", "sllm"])
        except SystemExit as e:
            print("CLI", e.code)
        try:
            LoadConfig(load_format="sllm")
        except BadInput as e:
            print("LOADCONFIG", e)
        print("AUTO", prepare_server_args(["--model-path", MODEL, "--device", "cpu"]).load_format)
    """.replace("MODEL", repr(model)))
    lines = out.splitlines()
    assert lines[0].startswith("CLI sllmfs: --load-format sllm supports SGLang 0.5.17 to 0.5.23, this is SGLang 0.5.24")
    assert lines[1].startswith("LOADCONFIG --load-format sllm supports SGLang 0.5.17 to 0.5.23")
    assert lines[2] == "AUTO auto" and len(lines) == 3


def test_overlap_startup_is_refused_with_one_line(tmp_path: Path) -> None:
    """SGLang's own launcher (``python -m sglang.launch_server``, run through the CPU import shim) with
    --startup-weight-load-mode overlap (0.5.18+): one line, exit status 1, before any process starts."""
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    if "--startup-weight-load-mode" not in parser._option_string_actions:
        pytest.skip(f"SGLang {compat.installed_version()} has no --startup-weight-load-mode")
    from sllmfs.ops.demo import build_model

    model = str(build_model(tmp_path / "m", "llama"))  # up to 0.5.19 ServerArgs reads its config.json first
    launch = ("from tests.support.sglang_env import import_sglang; import_sglang()\n"  # CPU torch: torchvision
              "import runpy; runpy.run_module('sglang.launch_server', run_name='__main__', alter_sys=True)")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", launch, "--model-path", model, "--device", "cpu",
                           "--load-format", "sllm", "--startup-weight-load-mode", "overlap"],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                 os.environ.get("PYTHONPATH")]))})
    assert proc.returncode == 1
    ours = [line for line in proc.stderr.splitlines() if "sllmfs" in line or "Traceback" in line]
    assert ours == [f"sllmfs: {compat.overlap_problem('sllm', 'overlap')}"], proc.stderr[-3000:]
    assert compat.overlap_problem("sllm", "serial") is None and compat.overlap_problem("auto", "overlap") is None


def test_preloaded_weights_bytes_is_honest() -> None:
    """No weight of ours is on the GPU before SGLang samples its free memory: 0, which SGLang (0.5.19+)
    accepts and adds nothing for."""
    import types

    from sglang.srt.model_executor.model_runner import ModelRunner

    loader = SllmModelLoader(LoadConfig(load_format=SllmModelLoader))
    assert loader.preloaded_weights_bytes == 0 and type(loader.preloaded_weights_bytes) is int
    prop = getattr(ModelRunner, "preloaded_weights_bytes", None)
    if isinstance(prop, property):  # 0.5.19+: SGLang's own check of the value
        assert prop.fget(types.SimpleNamespace(loader=loader)) == 0


def test_overlap_is_refused_where_load_config_is_built(tmp_path: Path) -> None:
    """The Python Engine never runs the CLI's check: a scheduler with the overlap mode published refuses
    --load-format sllm with one line where it builds its LoadConfig, before SGLang's own loader checks."""
    from sglang.srt import runtime_context

    from sllmfs.ops.demo import build_model

    if not hasattr(runtime_context, "SpawnRanks"):  # 0.5.21+
        pytest.skip(f"SGLang {compat.installed_version()} publishes no rank placement")
    model = str(build_model(tmp_path / "m", "llama"))
    out = _python("""
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.configs.load_config import LoadConfig
        from sglang.srt.runtime_context import SpawnRanks, publish
        from sglang.srt.server_args import ServerArgs
        from sllmfs.core.errors import BadInput
        try:
            sa = ServerArgs(model_path=MODEL, device="cpu", load_format="sllm", startup_weight_load_mode="overlap")
        except TypeError:
            print("NO OVERLAP MODE")
            raise SystemExit(0)
        if hasattr(sa, "resolve_once"):
            sa.resolve_once()
        publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=0))
        try:
            LoadConfig(load_format="sllm")
        except BadInput as e:
            print("REFUSED", e)
        print("AUTO", LoadConfig(load_format="auto").load_format.value)
    """.replace("MODEL", repr(model)))
    if out.strip() == "NO OVERLAP MODE":
        pytest.skip(f"SGLang {compat.installed_version()} has no --startup-weight-load-mode")
    assert out.splitlines() == [f"REFUSED {compat.overlap_problem('sllm', 'overlap')}", "AUTO auto"]
