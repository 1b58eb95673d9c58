"""SllmModelLoader's paths on CPU with a small real torch model (no CUDA, no sidecar).

The model stands in for an SGLang model class: it has ``load_weights`` that fuses
q/k/v like SGLang's stacked parameters, a tied head, and a layer whose
``quant_method.process_weights_after_loading`` repacks its weight (as FP8/AWQ
methods do), so the per-rank state differs from the hf tensors. Weights come
from a real store through StoreSource (the sidecar's stand-in on one host).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.support.sglang_env import require_sglang

require_sglang()

from sglang.srt.configs.load_config import LoadConfig  # noqa: E402

from sllmfs.core.errors import BadInput, Corrupt, NotFound  # noqa: E402
from sllmfs.integrations.common import writeback  # noqa: E402
from sllmfs.integrations.common.copy import copy_into  # noqa: E402
from sllmfs.integrations.common.locate import Located  # noqa: E402
from sllmfs.integrations.common.snapshot import snapshot  # noqa: E402
from sllmfs.integrations.common.source import StoreSource  # noqa: E402
from sllmfs.integrations.sglang import variants  # noqa: E402
from sllmfs.integrations.sglang.loader import SllmModelLoader, load_any_tp, rank_state  # noqa: E402
from sllmfs.store.save import save_model  # noqa: E402
from sllmfs.store.store import Store  # noqa: E402

H, V = 16, 32
MODEL = "org/tiny"
WANT = variants.make(tp_size=1, tp_rank=0, dtype="bfloat16", quant="repack", sglang_version="0.5.17")
CPU = torch.device("cpu")


class Repack:
    """A quantization method's post-processing: the loaded weight is replaced by a repacked one."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.weight = nn.Parameter(layer.weight.data.t().contiguous() * 2, requires_grad=False)


class RepackedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(H, H), requires_grad=False)
        self.quant_method = Repack()


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(V, H)
        self.qkv_proj = nn.Linear(H, 3 * H, bias=False)
        self.o_proj = RepackedLinear()
        self.lm_head = nn.Linear(H, V, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied: one storage, two names
        self.post_loaded = 0
        for p in self.parameters():
            nn.init.zeros_(p)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        for name, w in weights:
            short = name.removeprefix("model.")
            if short.split(".")[0] in ("q_proj", "k_proj", "v_proj"):
                i = "qkv".index(short[0])
                params["qkv_proj.weight"].data[i * H : (i + 1) * H].copy_(w)
            else:
                params[short].data.copy_(w)
        self.post_load_weights()

    def post_load_weights(self) -> None:
        self.post_loaded += 1


@pytest.fixture
def store(tmp_path: Path) -> Store:
    g = torch.Generator().manual_seed(1)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    tensors = {f"model.{n}.weight": torch.randn(*shape, generator=g).to(torch.bfloat16)
               for n, shape in [("embed_tokens", (V, H)), ("q_proj", (H, H)), ("k_proj", (H, H)),
                                ("v_proj", (H, H)), ("o_proj", (H, H))]}
    save_file(tensors, ckpt / "model.safetensors")
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["TinyLM"]}))
    s = Store(tmp_path / "store")
    save_model(s, MODEL, ckpt)
    return s


def new_model() -> TinyLM:
    with torch.device("cpu"):
        m = TinyLM()
    return m.to(torch.bfloat16)


def _loader(store: Store, **extra: object) -> SllmModelLoader:
    cfg = LoadConfig(load_format=SllmModelLoader, model_loader_extra_config=dict(extra))
    return SllmModelLoader(cfg, source_factory=lambda loc: StoreSource(loc.model, loc.storage_path))


def _source(store: Store) -> StoreSource:
    return StoreSource(MODEL, str(store.root))


def _located(store: Store) -> Located:
    return Located(MODEL, "/nonexistent.sock", None, str(store.root))


def _reference(store: Store) -> dict[str, torch.Tensor]:
    """What SGLang's default loader would produce: load_weights, then quant post-processing."""
    m = new_model()
    with _source(store).open("hf") as lease:
        load_any_tp(m, lease, CPU)
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_any_tp_path_feeds_load_weights_and_post_processes(store: Store) -> None:
    m = new_model()
    with _source(store).open("hf") as lease:
        load_any_tp(m, lease, CPU)
        hf = {k: v.clone() for k, v in lease.tensors().items()}
    assert m.post_loaded == 1
    assert torch.equal(m.qkv_proj.weight[H : 2 * H], hf["model.k_proj.weight"])
    assert torch.equal(m.o_proj.weight, hf["model.o_proj.weight"].t() * 2)  # repacked after loading
    assert m.lm_head.weight.data_ptr() == m.embed_tokens.weight.data_ptr()


def test_rank_state_keeps_tied_storage_once(store: Store) -> None:
    state = rank_state(new_model())
    assert "embed_tokens.weight" in state and "lm_head.weight" not in state


def test_first_start_takes_any_tp_and_writes_back_then_fast_path(store: Store) -> None:
    loader = _loader(store, sllm_write_back="sync")
    model, replace = loader._fast_path(_source(store), WANT, new_model, CPU)
    assert model is None and replace is False  # nothing stored for this rank yet
    model = loader._any_tp_path(_source(store), WANT, new_model, CPU)
    loader._write_back(_located(store), WANT, model, replace)
    assert loader.write_back is not None and loader.write_back.error is None
    assert WANT.key in store.get(MODEL).variants

    second = _loader(store)
    fast, _ = second._fast_path(_source(store), WANT, new_model, CPU)
    assert fast is not None and second.path_taken == "fast"
    assert fast.post_loaded == 1  # SGLang's post-load hook ran after the copy
    ref = _reference(store)
    got = fast.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_background_write_back(store: Store) -> None:
    loader = _loader(store)  # default: async
    model = loader._any_tp_path(_source(store), WANT, new_model, CPU)
    loader._write_back(_located(store), WANT, model, False)
    assert loader.write_back is not None
    loader.write_back.join(60)
    assert loader.write_back.result is not None and WANT.key in store.get(MODEL).variants


def _store_rank_state(store: Store, want: variants.RankVariant, state: dict[str, torch.Tensor]) -> None:
    writeback.write_rank_state(store, MODEL, want, snapshot(state), replace=True)


def test_variant_for_another_layout_falls_back(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    other = variants.make(tp_size=2, tp_rank=0, dtype="bfloat16", quant="repack", sglang_version="0.5.16")
    m = new_model()
    with _source(store).open("hf") as lease:
        load_any_tp(m, lease, CPU)
    state = rank_state(m)
    # stored under this process's key but recorded for another layout (e.g. copied by hand)
    writeback.write_rank_state(store, MODEL, other, snapshot(state))
    vdir = store.get(MODEL).variant_dir(other.key)
    os.rename(vdir, vdir.with_name(WANT.key))
    model, replace = _loader(store)._fast_path(_source(store), WANT, new_model, CPU)
    assert model is None and replace is True
    assert "not usable" in caplog.text and "0.5.16" in caplog.text


def test_variant_with_other_shapes_falls_back(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    state = rank_state(_loader(store)._any_tp_path(_source(store), WANT, new_model, CPU))
    state["qkv_proj.weight"] = state["qkv_proj.weight"][:H]
    _store_rank_state(store, WANT, state)
    model, replace = _loader(store)._fast_path(_source(store), WANT, new_model, CPU)
    assert model is None and replace is True and "qkv_proj.weight" in caplog.text


def test_corrupt_per_rank_variant_falls_back(store: Store) -> None:
    class Damaged(StoreSource):
        def open(self, variant: str, *, gpu_first: bool = True):  # type: ignore[no-untyped-def]
            if variant.startswith("sglang."):
                raise Corrupt(f"checksum mismatch in {variant}")
            return super().open(variant, gpu_first=gpu_first)

    _store_rank_state(store, WANT, rank_state(_loader(store)._any_tp_path(_source(store), WANT, new_model, CPU)))
    model, replace = _loader(store)._fast_path(Damaged(MODEL, str(store.root)), WANT, new_model, CPU)
    assert model is None and replace is True


def test_missing_model_and_hf_variant_are_clear_errors(store: Store) -> None:
    with pytest.raises(NotFound, match=r"sllmfs save --model org/absent"):
        _loader(store)._any_tp_path(StoreSource("org/absent", str(store.root)), WANT, new_model, CPU)
    (store.get(MODEL).variant_dir("hf") / "manifest.json").unlink()
    with pytest.raises(Exception, match="org/tiny"):
        _loader(store)._any_tp_path(_source(store), WANT, new_model, CPU)


def test_secondary_weights_are_refused(store: Store) -> None:
    m = new_model()
    m.secondary_weights = ["another checkpoint"]  # type: ignore[assignment]
    with pytest.raises(BadInput, match="second checkpoint"), _source(store).open("hf") as lease:
        load_any_tp(m, lease, CPU)


def test_copy_into_moves_all_bytes(store: Store) -> None:
    src = {"a": torch.ones(4, 4, dtype=torch.bfloat16), "b": torch.arange(3.0)}
    _store_rank_state(store, WANT, {k: v.clone() for k, v in src.items()})
    dst = {"a": torch.zeros(4, 4, dtype=torch.bfloat16), "b": torch.zeros(3, 2)[:, 0]}  # b: non-contiguous
    with _source(store).open(WANT.key) as lease:
        assert copy_into(lease, dst) == 4 * 4 * 2 + 3 * 4
    assert torch.equal(dst["a"], src["a"]) and torch.equal(dst["b"], src["b"])


# -- through a real sidecar (handle protocol + copy engine on its host target) --------------------


def test_through_the_sidecar_any_tp_write_back_then_fast(store: Store, tmp_path: Path) -> None:
    from sllmfs.integrations.common.source import SidecarSource
    from tests.support.sidecar import sidecar

    with sidecar(tmp_path, store=store.root) as sd:
        src = SidecarSource(MODEL, str(sd.socket))
        loader = _loader(store, sllm_write_back="sync")
        model, replace = loader._fast_path(src, WANT, new_model, CPU)
        assert model is None and replace is False
        model = loader._any_tp_path(src, WANT, new_model, CPU)
        loader._write_back(_located(store), WANT, model, replace)
        assert loader.write_back is not None and loader.write_back.error is None

        again = _loader(store)
        fast, _ = again._fast_path(SidecarSource(MODEL, str(sd.socket)), WANT, new_model, CPU)
        assert fast is not None and again.path_taken == "fast"
        ref = _reference(store)
        for k, v in fast.state_dict().items():
            assert torch.equal(v, ref[k]), k


def test_no_sidecar_is_one_clear_error(store: Store, tmp_path: Path) -> None:
    from sllmfs.core.errors import SllmfsError
    from sllmfs.integrations.common.source import SidecarSource

    src = SidecarSource(MODEL, str(tmp_path / "absent.sock"))
    with pytest.raises(SllmfsError, match=r"cannot reach the sllmfs sidecar .* to load 'org/tiny'.*sllmfs start"):
        _loader(store)._fast_path(src, WANT, new_model, CPU)
