"""SGLang integration parts that need no SGLang: variant keys, locate(), write-back format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sllmfs.core import names
from sllmfs.core.errors import BadInput, FormatVersionError, NotFound
from sllmfs.integrations.common import writeback
from sllmfs.integrations.common.locate import locate
from sllmfs.integrations.common.snapshot import snapshot
from sllmfs.integrations.common.source import StoreSource
from sllmfs.integrations.sglang import variants
from sllmfs.protocol.marker import MARKER_NAME
from sllmfs.store.reader import VariantReader
from sllmfs.store.save import save_model
from sllmfs.store.store import Store

# -- variant keys -------------------------------------------------------------


def test_variant_key_round_trip() -> None:
    v = variants.make(tp_size=2, tp_rank=1, dtype=torch.bfloat16, quant=None, sglang_version="0.5.17")
    assert v.key == "sglang.tp2.r1.bfloat16.none.v0.5.17"
    assert variants.parse(v.key) == v
    assert names.check_variant(v.key) == v.key


def test_variant_key_optional_parts_and_odd_values() -> None:
    v = variants.make(tp_size=8, tp_rank=7, pp_size=2, pp_rank=1, ep_size=8, draft=1, dtype="torch.float16",
                      quant="W8A8_Int8", sglang_version="0.5.17.post1+CU130")
    assert v.key == "sglang.tp8.r7.pp2.s1.ep8.draft1.float16.w8a8_int8.v0.5.17.post1+cu130"
    assert variants.parse(v.key) == v
    dotted = variants.make(tp_size=1, tp_rank=0, dtype="bfloat16", quant="mxfp4.v2", sglang_version="0.5.17")
    assert dotted.key == "sglang.tp1.r0.bfloat16.mxfp4-v2.v0.5.17"
    assert variants.parse(dotted.key).quant == "mxfp4-v2"


def test_variant_keys_differ_by_everything_that_changes_the_state() -> None:
    base = dict(tp_size=2, tp_rank=0, dtype="bfloat16", quant=None, sglang_version="0.5.17")
    keys = {variants.make(**base).key}
    for change in ({"tp_size": 4}, {"tp_rank": 1}, {"dtype": "float16"}, {"quant": "fp8"},
                   {"sglang_version": "0.5.18"}, {"pp_size": 2}, {"ep_size": 2}, {"draft": 0}):
        keys.add(variants.make(**{**base, **change}).key)
    assert len(keys) == 9


@pytest.mark.parametrize("bad", ["hf", "sglang.tp2.bfloat16.none.v0.5.17", "sglang.tp2.r0.bf16",
                                 "SGLANG.tp2.r0.bfloat16.none.v0.5.17", "sglang.tp2.r0.bfloat16.none.v..1"])
def test_variant_parse_rejects(bad: str) -> None:
    with pytest.raises(BadInput):
        variants.parse(bad)


def test_variant_rejects_impossible_layout() -> None:
    with pytest.raises(BadInput, match="impossible"):
        variants.make(tp_size=2, tp_rank=2, dtype="bfloat16", quant=None, sglang_version="0.5.17")


# -- locate -------------------------------------------------------------------


def _mount(tmp_path: Path, info: dict[str, object]) -> Path:
    root = tmp_path / "mnt"
    (root / "Qwen" / "Qwen2.5-7B").mkdir(parents=True)
    (root / MARKER_NAME).write_text(json.dumps(info))
    return root


def test_locate_under_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLLMFS_STORAGE_PATH", str(tmp_path / "store"))
    root = _mount(tmp_path, {"socket": "/run/sllmfs/x.sock", "version": 1})
    got = locate(str(root / "Qwen" / "Qwen2.5-7B"))
    assert (got.model, got.socket, got.mount) == ("Qwen/Qwen2.5-7B", "/run/sllmfs/x.sock", root)
    assert got.storage_path == str(tmp_path / "store")
    assert locate(str(root / "Qwen" / "Qwen2.5-7B"), socket="/other.sock").socket == "/other.sock"


def test_locate_mount_errors(tmp_path: Path) -> None:
    root = _mount(tmp_path, {"socket": "/s", "version": 1})
    with pytest.raises(BadInput, match="the sllmfs mount itself"):
        locate(str(root))
    (root / MARKER_NAME).write_text(json.dumps({"socket": "/s", "version": 9}))
    with pytest.raises(FormatVersionError, match="version 9"):
        locate(str(root / "Qwen" / "Qwen2.5-7B"))
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(BadInput, match="not under an sllmfs mount"):
        locate(str(plain))


def test_locate_model_name_uses_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLLMFS_SOCKET", "/run/custom.sock")
    got = locate("Qwen/Qwen2.5-7B")
    assert (got.model, got.socket, got.mount) == ("Qwen/Qwen2.5-7B", "/run/custom.sock", None)
    with pytest.raises(BadInput, match="neither a directory"):
        locate("../etc/passwd")


# -- write-back format --------------------------------------------------------


def test_write_back_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(writeback.ENV, raising=False)
    assert writeback.mode() == writeback.ASYNC
    assert writeback.mode(False) == writeback.OFF
    assert writeback.mode("sync") == writeback.SYNC
    monkeypatch.setenv(writeback.ENV, "0")
    assert writeback.mode() == writeback.OFF
    assert writeback.mode(True) == writeback.ASYNC  # the extra config wins over the environment
    with pytest.raises(BadInput, match="sllm_write_back"):
        writeback.mode("maybe")


def _rank_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(64, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.qkv_proj.weight": torch.randn(48, 16, generator=g).to(torch.float8_e4m3fn),
        "model.layers.0.qkv_proj.weight_scale": torch.tensor(0.5),  # 0-dim
        "model.layers.0.mask": torch.rand(7, generator=g) > 0.5,
        "model.empty": torch.empty(0, 4),
        "model.transposed": torch.randn(8, 4, generator=g).t(),  # non-contiguous
    }


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture
def stored_llama(store_path: Path, llama_dir: Path) -> Store:
    store = Store(store_path)
    save_model(store, "org/llama", llama_dir)
    return store


def test_write_rank_state_round_trip(stored_llama: Store) -> None:
    v = variants.make(tp_size=2, tp_rank=1, dtype="bfloat16", quant="fp8", sglang_version="0.5.17")
    state = _rank_state()
    expected = {k: t.clone() for k, t in state.items()}
    m = writeback.write_rank_state(stored_llama, "org/llama", v, snapshot(state))
    assert m is not None and m.variant == v.key
    info = stored_llama.get("org/llama")
    assert v.key in info.variants and "hf" in info.variants
    stored = info.manifest(v.key)
    assert stored.metadata["kind"] == v.framework.state_kind and stored.metadata["sglang"] == v.layout()
    with VariantReader(info.variant_dir(v.key)) as r:
        for name, t in expected.items():
            got = r.tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(_raw(got), _raw(t)), name
    # the same bytes through the lease interface the loader uses
    with StoreSource("org/llama", str(stored_llama.root)).open(v.key) as lease:
        views = lease.tensors()
        for name, t in expected.items():
            assert torch.equal(_raw(views[name]), _raw(t)), name


def test_write_rank_state_race_and_replace(stored_llama: Store) -> None:
    v = variants.make(tp_size=1, tp_rank=0, dtype="bfloat16", quant=None, sglang_version="0.5.17")
    first = {"w": torch.ones(4, dtype=torch.bfloat16)}
    assert writeback.write_rank_state(stored_llama, "org/llama", v, dict(first)) is not None
    # a peer already committed this key: not an error, nothing replaced
    assert writeback.write_rank_state(stored_llama, "org/llama", v, {"w": torch.zeros(4)}) is None
    with StoreSource("org/llama", str(stored_llama.root)).open(v.key) as lease:
        assert torch.equal(lease.tensors()["w"], first["w"])
    # a stale variant is replaced when asked
    writeback.write_rank_state(stored_llama, "org/llama", v, {"w": torch.full((4,), 2.0)}, replace=True)
    with StoreSource("org/llama", str(stored_llama.root)).open(v.key) as lease:
        assert torch.equal(lease.tensors()["w"], torch.full((4,), 2.0))
    assert not [p for p in (stored_llama.root / "tmp").iterdir() if p.suffix != ".lock"]


def test_write_back_thread_reports_missing_model(store_path: Path) -> None:
    Store(store_path)
    v = variants.make(tp_size=1, tp_rank=0, dtype="bfloat16", quant=None, sglang_version="0.5.17")
    wb = writeback.WriteBack(str(store_path), "org/absent", v, {"w": torch.ones(2)}, replace=False).start()
    wb.join(30)
    assert isinstance(wb.error, NotFound) and wb.result is None


def test_store_source_missing_variant(stored_llama: Store) -> None:
    with pytest.raises(NotFound), StoreSource("org/llama", str(stored_llama.root)).open("sglang.tp1.r0.x.none.v1"):
        pass


def test_store_source_matches_checkpoint(stored_llama: Store, llama_dir: Path) -> None:
    from safetensors.torch import load_file

    src: dict[str, torch.Tensor] = {}
    for f in sorted(llama_dir.glob("*.safetensors")):
        src.update(load_file(f))
    with StoreSource("org/llama", str(stored_llama.root)).open("hf") as lease:
        views = lease.tensors()
        assert set(views) == set(src)
        for k, t in src.items():
            assert torch.equal(views[k], t), k


def test_locate_by_xattr_without_marker(tmp_path: Path) -> None:
    root = tmp_path / "mnt"
    model = root / "org" / "m"
    model.mkdir(parents=True)
    try:
        for d in (root, root / "org", model):  # the FUSE view answers the xattr on every inode
            os.setxattr(d, "user.sllmfs.socket", b"/run/x.sock")
    except OSError as e:
        pytest.skip(f"no user xattrs on {tmp_path} ({e.strerror})")
    got = locate(str(model))
    assert (got.model, got.socket, got.mount) == ("org/m", "/run/x.sock", root)


def test_write_back_lands_in_the_memory_tier(tmp_path: Path, llama_dir: Path) -> None:
    """The per-rank state a first start writes back is filled into the sidecar's memory tier at once
    (its bytes are still in the page cache): the next start is a memory-tier hit."""
    import time

    from sllmfs.store.save import save_model
    from tests.support.sidecar import sidecar

    with sidecar(tmp_path) as sd:
        save_model(Store(sd.store), "org/llama", llama_dir)
        v = variants.make(tp_size=1, tp_rank=0, dtype="bfloat16", quant=None, sglang_version="0.5.17")
        expected = torch.arange(1 << 16, dtype=torch.float32)
        wb = writeback.WriteBack(str(sd.store), "org/llama", v, {"w": expected.clone()}, replace=False,
                                 socket=str(sd.socket))  # the state is consumed as it is written
        wb.run()
        assert wb.result is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            resident = {x["variant"]: x["state"] for m in sd.status()["models"] for x in m["variants"]}
            if resident.get(v.key) == "ready":
                break
            time.sleep(0.05)
        assert resident.get(v.key) == "ready", resident
        hits = sd.status()["counters"]["hits"]
        with sd.connect() as c, c.acquire("org/llama", v.key) as lease:
            assert torch.equal(lease.tensors(timeout=30)["w"], expected)
        assert sd.status()["counters"]["hits"] == hits + 1


def test_write_back_never_lands_on_a_model_replaced_meanwhile(tmp_path: Path, llama_dir: Path,
                                                              qwen_tied_dir: Path) -> None:
    """State made from the old weights must not become the new model's fast path."""
    store = Store(tmp_path / "store")
    save_model(store, "m", llama_dir)
    base = writeback.hf_identity(str(store.root), "m")
    assert base is not None
    save_model(store, "m", qwen_tied_dir, force=True)  # `sllmfs save --force` while the write-back ran
    v = variants.make(tp_size=1, tp_rank=0, dtype="bfloat16", quant=None, sglang_version="0.5.17")
    assert writeback.write_rank_state(store, "m", v, {"w": torch.ones(4)}, base=base) is None
    assert store.get("m").variants == ["hf"]
    now = writeback.hf_identity(str(store.root), "m")
    assert writeback.write_rank_state(store, "m", v, {"w": torch.ones(4)}, base=now) is not None
    assert v.key in store.get("m").variants
