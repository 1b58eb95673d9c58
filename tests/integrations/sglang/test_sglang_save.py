"""``sllmfs save --backend sglang``: the engine's arguments, its own process, an honest report, reruns.

SGLang's engine needs a GPU per rank; here a stand-in engine process writes what each rank's
write-back would (real store commits) and ends as a real engine may: normally, killed by SIGKILL
after committing (the H200's out-of-memory kill), or failing halfway. The arguments are checked
against SGLang 0.5.17's own ServerArgs where SGLang imports (.venv-sglang).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sllmfs.core.errors import BadInput, NotFound, SllmfsError
from sllmfs.integrations.sglang import variants
from sllmfs.integrations.sglang.save import SAVE_KV_TOKENS, engine_args, save_rank_variants
from sllmfs.store.save import save_model
from sllmfs.store.store import Store
from tests.support.sglang_env import import_sglang

try:  # where SGLang is installed (.venv-sglang) it goes first: then torchvision imports beside a CPU torch
    import_sglang()
except ImportError:
    pass  # the main venv: every test but the ServerArgs one runs without SGLang

VERSION = "0.5.17"


@pytest.fixture
def stored_llama(store_path: Path, llama_dir: Path) -> Store:
    store = Store(store_path)
    save_model(store, "org/llama", llama_dir)
    return store


def key(tp: int, rank: int) -> str:
    return variants.make(tp_size=tp, tp_rank=rank, dtype="bfloat16", quant=None, sglang_version=VERSION).key


def stand_in(ranks: list[int], *, tp: int, end: str = "") -> object:
    """An engine process that commits ``ranks`` as the write-back does, then runs ``end``."""
    def command(kwargs: dict[str, object]) -> list[str]:
        extra = json.loads(str(kwargs["model_loader_extra_config"]))
        code = textwrap.dedent(f"""
            import os, signal, sys, torch
            from sllmfs.integrations.common import writeback
            from sllmfs.integrations.sglang import variants
            from sllmfs.store.store import Store
            store = Store({extra["sllm_storage_path"]!r})
            for rank in {ranks!r}:
                v = variants.make(tp_size={tp}, tp_rank=rank, dtype="bfloat16", quant=None, sglang_version="{VERSION}")
                writeback.write_rank_state(store, {extra["sllm_model"]!r}, v, {{"w": torch.full((4,), float(rank))}})
            print("engine log line", flush=True)
            {end}
        """)
        return [sys.executable, "-c", code]
    return command


def test_engine_args_hold_only_what_producing_the_state_needs(stored_llama: Store, tmp_path: Path) -> None:
    args = engine_args(stored_llama, "org/llama", 2, config_dir=tmp_path / "cfg", dtype="bfloat16")
    assert args["load_format"] == "sllm" and args["tp_size"] == 2 and args["dtype"] == "bfloat16"
    assert Path(args["model_path"]) == tmp_path / "cfg"  # the checked copy, not the store's files/
    assert (Path(args["model_path"]) / "config.json").read_bytes() == \
        (stored_llama.get("org/llama").files_dir / "config.json").read_bytes()
    extra = json.loads(args["model_loader_extra_config"])
    assert extra == {"sllm_model": "org/llama", "sllm_storage_path": str(stored_llama.root), "sllm_write_back": "sync"}
    assert args["disable_cuda_graph"] is True and args["skip_tokenizer_init"] is True
    assert args["max_total_tokens"] == SAVE_KV_TOKENS and args["max_running_requests"] == 1
    assert args["chunked_prefill_size"] <= SAVE_KV_TOKENS and args["disable_radix_cache"] is True
    with pytest.raises(BadInput, match="must be 1 or more"):
        engine_args(stored_llama, "org/llama", 0, config_dir=tmp_path / "x")
    with pytest.raises(NotFound, match="sllmfs save --model org/absent"):
        engine_args(stored_llama, "org/absent", 1, config_dir=tmp_path / "x")


def test_sglang_0517_takes_the_engine_args_as_given(tmp_path: Path) -> None:
    """SGLang's own ServerArgs (its __post_init__ resolves defaults) keeps every limit the save sets."""
    from tests.support.sglang_env import require_sglang

    require_sglang()
    from sglang.srt.server_args import ServerArgs

    from sllmfs.ops.demo import build_model

    store = Store(tmp_path / "store")  # a model of its own: SGLang pins the transformers that builds it
    save_model(store, "org/llama", build_model(tmp_path / "llama", "llama"))
    args = engine_args(store, "org/llama", 2, config_dir=tmp_path / "cfg")
    sa = ServerArgs(**args, device="cpu")  # no accelerator here: SGLang would refuse to pick a device
    assert sa.disable_cuda_graph and sa.skip_tokenizer_init and sa.disable_radix_cache
    assert sa.max_total_tokens == SAVE_KV_TOKENS and sa.max_running_requests == 1
    assert sa.chunked_prefill_size == args["chunked_prefill_size"]
    assert sa.mem_fraction_static == args["mem_fraction_static"]
    assert sa.load_format == "sllm" and sa.tp_size == 2


def test_engine_killed_after_committing_every_rank_is_a_success(stored_llama: Store) -> None:
    """The H200 case: the engine died by SIGKILL after both ranks were committed; the report says so."""
    said: list[str] = []
    report = save_rank_variants(stored_llama, "org/llama", 2, version=VERSION, say=said.append,
                                command=stand_in([0, 1], tp=2, end="os.kill(os.getpid(), signal.SIGKILL)"))
    assert report.engine_rc == -9
    assert report.stored == said == [key(2, 0), key(2, 1)] and report.kept == []
    assert set(report.keys) <= set(stored_llama.get("org/llama").variants)


def test_a_partial_engine_run_says_what_is_stored_and_a_rerun_finishes_it(stored_llama: Store) -> None:
    with pytest.raises(SllmfsError) as failed:
        save_rank_variants(stored_llama, "org/llama", 2, version=VERSION,
                           command=stand_in([0], tp=2, end="sys.exit(3)"))
    msg = str(failed.value)
    assert "exited with status 3" in msg and "1 of 2 ranks" in msg and key(2, 0) in msg and "keeps them" in msg
    assert "run the same command again" in msg
    assert "\n" not in msg
    report = save_rank_variants(stored_llama, "org/llama", 2, version=VERSION, command=stand_in([1], tp=2))
    assert report.engine_rc == 0 and report.kept == [key(2, 0)] and report.stored == [key(2, 1)]


def test_a_complete_set_starts_no_engine(stored_llama: Store) -> None:
    save_rank_variants(stored_llama, "org/llama", 2, version=VERSION, command=stand_in([0, 1], tp=2))

    def no_engine(kwargs: dict[str, object]) -> list[str]:
        raise AssertionError("an engine was started for a complete set")

    again = save_rank_variants(stored_llama, "org/llama", 2, version=VERSION, command=no_engine)
    assert again.engine_rc is None and again.stored == [] and again.kept == [key(2, 0), key(2, 1)]
    # another TP size is another set: TP=1 is not complete because TP=2 is
    one = save_rank_variants(stored_llama, "org/llama", 1, version=VERSION, command=stand_in([0], tp=1))
    assert one.stored == [key(1, 0)]


def test_engine_output_goes_to_stderr_and_the_report_to_stdout(stored_llama: Store, tmp_path: Path) -> None:
    """Through a real process as the CLI prints it: stdout holds only `stored ...` lines."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[3])!r}]  # and tests.support
        from test_sglang_save import stand_in
        from sllmfs.integrations.sglang.save import save_rank_variants
        from sllmfs.store.store import Store
        save_rank_variants(Store({str(stored_llama.root)!r}), "org/llama", 2, version="{VERSION}",
                           command=stand_in([0, 1], tp=2), say=lambda k: print("stored", k, flush=True))
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"stored {key(2, 0)}", f"stored {key(2, 1)}"]
    assert "engine log line" in proc.stderr
