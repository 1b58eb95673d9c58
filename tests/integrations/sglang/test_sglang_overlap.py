"""The fast path's copy beside the model build (sllmfs.integrations.common.overlap) on CPU, real store and sidecar.

PlannedLM allocates its weights as SGLang models do (``torch.empty``), plus the cases the
plan must stay clear of: a parameter the build writes to, one the post-processing replaces,
one it changes in place, a ``torch.ones`` norm and a tied head. Every test compares the
loaded state with SGLang's default order (load_weights, then post-processing).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.support.sglang_env import require_sglang

require_sglang()

from sllmfs.integrations.common import overlap, writeback  # noqa: E402
from sllmfs.integrations.common.locate import Located  # noqa: E402
from sllmfs.integrations.common.snapshot import snapshot  # noqa: E402
from sllmfs.integrations.common.source import StoreSource  # noqa: E402
from sllmfs.integrations.sglang import variants  # noqa: E402
from sllmfs.integrations.sglang.fastpath import AFTER, BESIDE, rank_state  # noqa: E402
from sllmfs.integrations.sglang.loader import SllmModelLoader, load_any_tp  # noqa: E402
from sllmfs.store.save import save_model  # noqa: E402
from sllmfs.store.store import Store  # noqa: E402

H, V = 16, 32
BF = torch.bfloat16
MODEL = "org/planned"
WANT = variants.make(tp_size=1, tp_rank=0, dtype="bfloat16", quant="none", sglang_version="0.5.17")
CPU = torch.device("cpu")
PLANNABLE = {"qkv_proj.weight", "gate_proj.weight", "up_proj.weight", "doubled.weight"}


class Repack:
    """Post-processing that replaces the weight (as FP8/AWQ repacking does)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.weight = nn.Parameter(layer.weight.data.t().contiguous() * 2, requires_grad=False)


class DoubleInPlace:
    """Post-processing that changes the weight where it lies."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.weight.data.mul_(2)


class EmptyLinear(nn.Module):
    def __init__(self, rows: int, cols: int, quant_method: object = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=BF), requires_grad=False)
        if quant_method is not None:
            self.quant_method = quant_method


class PlannedLM(nn.Module):
    swap = False  # allocate gate/up in the other order (same shapes): a build that no longer fits the plan
    scratch_first = False  # allocate the scratch buffer before `doubled` (same shape) instead of after
    alias_doubled = False  # `doubled` also registered as `a_alias` (the stored state keeps the smaller name)

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Parameter(torch.empty(V, H, dtype=BF), requires_grad=False)
        self.qkv_proj = EmptyLinear(3 * H, H)
        for name in ("up_proj", "gate_proj") if PlannedLM.swap else ("gate_proj", "up_proj"):
            setattr(self, name, EmptyLinear(H, H))
        self.o_proj = EmptyLinear(H, H, Repack())
        if PlannedLM.scratch_first:
            self.register_buffer("scratch", torch.empty(H, H, dtype=BF), persistent=False)
        self.doubled = EmptyLinear(H, H, DoubleInPlace())
        if not PlannedLM.scratch_first:
            self.register_buffer("scratch", torch.empty(H, H, dtype=BF), persistent=False)
        if PlannedLM.alias_doubled:
            self.a_alias = self.doubled
        self.scale = nn.Parameter(torch.empty(H, dtype=BF), requires_grad=False)
        self.scale.data.fill_(0.5)  # written by the build itself
        self.norm = nn.Parameter(torch.ones(H, dtype=BF), requires_grad=False)
        self.lm_head = nn.Module()
        self.lm_head.weight = self.embed_tokens  # tied: one storage, two names
        self.post_loaded = 0

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, w in weights:
            short = name.removeprefix("model.").removesuffix(".weight")
            if short in ("q_proj", "k_proj", "v_proj"):
                i = "qkv".index(short[0])
                self.qkv_proj.weight.data[i * H : (i + 1) * H].copy_(w)
            elif short == "embed_tokens":
                self.embed_tokens.data.copy_(w)
            else:
                getattr(self, short).weight.data.copy_(w)
        self.post_load_weights()

    def post_load_weights(self) -> None:
        self.post_loaded += 1


@pytest.fixture(autouse=True)
def _unswapped() -> Iterable[None]:
    yield
    PlannedLM.swap = PlannedLM.scratch_first = PlannedLM.alias_doubled = False


@pytest.fixture
def store(tmp_path: Path) -> Store:
    g = torch.Generator().manual_seed(2)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shapes = [("embed_tokens", (V, H))] + [(n, (H, H)) for n in
                                            ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "doubled")]
    save_file({f"model.{n}.weight": torch.randn(*s, generator=g).to(BF) for n, s in shapes}, ckpt / "model.safetensors")
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["PlannedLM"]}))
    s = Store(tmp_path / "store")
    save_model(s, MODEL, ckpt)
    return s


def _loader(**extra: object) -> SllmModelLoader:
    from sglang.srt.configs.load_config import LoadConfig

    cfg = LoadConfig(load_format=SllmModelLoader, model_loader_extra_config=dict(extra))
    return SllmModelLoader(cfg)


def _source(store: Store) -> StoreSource:
    return StoreSource(MODEL, str(store.root))


def _reference(store: Store) -> dict[str, torch.Tensor]:
    m = PlannedLM()
    with _source(store).open("hf") as lease:
        load_any_tp(m, lease, CPU)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _first_start(store: Store, source: object = None) -> dict[str, object]:
    """Any-TP load + write-back; the stored plan's metadata."""
    loader = _loader(sllm_write_back="sync")
    model = loader._any_tp_path(source or _source(store), WANT, PlannedLM, CPU)  # type: ignore[arg-type]
    loader._write_back(Located(MODEL, "/nonexistent.sock", None, str(store.root)), WANT, model, False)
    assert loader.write_back is not None and loader.write_back.error is None
    return store.get(MODEL).manifest(WANT.key).metadata[overlap.PLAN_KEY]  # type: ignore[no-any-return]


def _assert_same(model: nn.Module, ref: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_plan_names_only_untouched_allocations(store: Store) -> None:
    plan = _first_start(store)
    names = {name for _i, name in plan["plan"]}  # type: ignore[index]
    # the tied weight is planned under whichever name the stored state keeps
    assert names - {"embed_tokens", "lm_head.weight"} == PLANNABLE
    assert len(names) == len(PLANNABLE) + 1
    calls = sorted(i for i, _n in plan["plan"])  # type: ignore[index]
    assert calls == sorted(set(calls)) and calls[0] == 0  # call numbers, the embedding first


def test_fast_path_copies_beside_the_build(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    _first_start(store)
    loader = _loader()
    with caplog.at_level(logging.INFO, logger="sllmfs.integrations.sglang"):
        model, _ = loader._fast_path(_source(store), WANT, PlannedLM, CPU)
    assert model is not None and loader.copy_ran == BESIDE and "beside the build" in caplog.text
    _assert_same(model, _reference(store))
    assert model.post_loaded == 1
    block = model.qkv_proj.weight.untyped_storage().data_ptr()  # type: ignore[union-attr]
    for name in ("gate_proj", "up_proj", "doubled"):  # views of one block, filled while the build ran
        assert getattr(model, name).weight.untyped_storage().data_ptr() == block
    assert model.scale.untyped_storage().data_ptr() != block  # written by the build: ordinary memory


def test_overlap_off_copies_after_the_build(store: Store) -> None:
    _first_start(store)
    loader = _loader(sllm_overlap=False)
    model, _ = loader._fast_path(_source(store), WANT, PlannedLM, CPU)
    assert model is not None and loader.copy_ran == AFTER
    _assert_same(model, _reference(store))


def test_variant_without_plan_copies_after_the_build(store: Store) -> None:
    m = PlannedLM()
    with _source(store).open("hf") as lease:
        load_any_tp(m, lease, CPU)
    writeback.write_rank_state(store, MODEL, WANT, snapshot(rank_state(m)))  # an older sllmfs
    loader = _loader()
    model, _ = loader._fast_path(_source(store), WANT, PlannedLM, CPU)
    assert model is not None and loader.copy_ran == AFTER
    _assert_same(model, _reference(store))


def test_plan_entry_with_other_shape_is_refused(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    plan = _first_start(store)
    by_name = {n: i for i, n in plan["plan"]}  # type: ignore[index]
    # gate's entry now names qkv's call (another shape); qkv's own entry is dropped
    wrong = [[by_name["qkv_proj.weight"], "gate_proj.weight"], [by_name["doubled.weight"], "doubled.weight"]]
    with _source(store).open(WANT.key) as lease:
        state = {k: v.clone() for k, v in lease.tensors().items()}
    meta = {overlap.PLAN_KEY: {"version": overlap.PLAN_VERSION, "plan": wrong, "build": plan["build"]}}  # type: ignore[index]
    writeback.write_rank_state(store, MODEL, WANT, state, replace=True, metadata=meta)
    loader = _loader()
    model, _ = loader._fast_path(_source(store), WANT, PlannedLM, CPU)
    assert model is not None and loader.copy_ran == BESIDE
    assert "1 of 2 planned tensors were not its views" in caplog.text
    _assert_same(model, _reference(store))


def test_build_in_another_order_falls_back(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    _first_start(store)
    PlannedLM.swap = True  # gate's planned call now allocates up_proj (same shape)
    model, replace = _loader()._fast_path(_source(store), WANT, PlannedLM, CPU)
    assert model is None and replace is True
    assert "another tensor's place" in caplog.text


def test_read_plan_rejects_what_it_cannot_use() -> None:
    build = [["bfloat16", 2, 2], ["bfloat16", 4]]
    entries = {"x": 1, "y": 1}

    def meta(**kw: object) -> dict[str, object]:
        return {overlap.PLAN_KEY: {"version": overlap.PLAN_VERSION, "plan": [[0, "x"]], "build": build, **kw}}

    assert overlap.read_plan({}, entries) is None
    assert overlap.read_plan(meta(version=99), entries) is None
    assert overlap.read_plan(meta(build=None), entries) is None  # an older plan without the build record
    got = overlap.read_plan(meta(plan=[[0, "x"], ["a", "y"], [1, "x"], [-1, "y"], [5, "y"], [1, "z"]]), entries)
    assert got is not None and got.views == {0: "x"} and got.build == build  # duplicates, bad calls, unknown names


def test_sizes_not_planned_for_get_their_own_memory() -> None:
    import numpy as np

    assert overlap._shape((2, 3), {}) == (2, 3)
    assert overlap._shape(((2, 3),), {}) == (2, 3)
    assert overlap._shape((torch.Size([4]),), {}) == (4,)
    assert overlap._shape((), {"size": [5, 6]}) == (5, 6)
    assert overlap._shape((np.int64(3),), {}) is None
    assert overlap._shape((torch.tensor(3),), {}) is None


def test_in_place_post_processing_of_a_module_shared_under_two_names(store: Store) -> None:
    PlannedLM.alias_doubled = True  # the stored state names it a_alias.weight, named_modules() says doubled
    _first_start(store)
    loader = _loader()
    model, _ = loader._fast_path(_source(store), WANT, PlannedLM, CPU)
    assert model is not None and loader.copy_ran == BESIDE
    _assert_same(model, _reference(store))


def test_view_that_lands_in_a_non_persistent_buffer_falls_back(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    _first_start(store)
    PlannedLM.scratch_first = True  # the call planned for doubled now allocates the scratch buffer (same shape)
    model, replace = _loader()._fast_path(_source(store), WANT, PlannedLM, CPU)
    assert model is None and replace is True
    assert "scratch lies inside the copied block" in caplog.text


def test_build_error_waits_for_the_copy(store: Store) -> None:
    import threading

    from sllmfs.integrations.sglang import fastpath

    _first_start(store)

    def broken() -> nn.Module:
        PlannedLM()
        raise RuntimeError("the build failed")

    with _source(store).open(WANT.key) as lease, pytest.raises(RuntimeError, match="the build failed"):
        fastpath.load(lease, broken, CPU, overlap.read_plan(lease.metadata, lease.entries))
    assert not any(t.name == "sllmfs-overlap-copy" for t in threading.enumerate())


def test_through_the_sidecar(store: Store, tmp_path: Path) -> None:
    from sllmfs.integrations.common.source import SidecarSource
    from tests.support.sidecar import sidecar

    with sidecar(tmp_path, store=store.root) as sd:
        _first_start(store, SidecarSource(MODEL, str(sd.socket)))
        loader = _loader()
        model, _ = loader._fast_path(SidecarSource(MODEL, str(sd.socket)), WANT, PlannedLM, CPU)
        assert model is not None and loader.copy_ran == BESIDE
        _assert_same(model, _reference(store))


def test_filter_subtensors_matches_sglang() -> None:
    from sglang.srt.model_loader.loader import ShardedStateLoader

    from sllmfs.integrations.common.state import filter_subtensors

    block = torch.arange(64, dtype=torch.float32)
    other = torch.zeros(8, 8)
    cases = {
        "b": block[0:16], "a": block[0:16],  # same bytes: the smaller name stays
        "inner": block[4:8], "whole": block, "tail": block[48:64], "strided": block[::2],
        "rows": other, "row0": other[0], "col": other[:, 1], "empty": block[:0],
        "own": torch.ones(3), "view2d": block[16:32].view(4, 4), "same2d": block[16:32].view(2, 8),
    }
    g = torch.Generator().manual_seed(0)
    for i in range(40):  # random runs of views of one block
        lo = int(torch.randint(0, 60, (1,), generator=g))
        cases[f"r{i}"] = block[lo : lo + int(torch.randint(0, 64 - lo, (1,), generator=g)) + 1]
    want = ShardedStateLoader._filter_subtensors(cases)
    got = filter_subtensors(cases)
    assert set(got) == set(want)
    pieces = {k: v for k, v in cases.items() if k not in ("whole", "rows", "strided", "col")}
    assert set(filter_subtensors(pieces)) == set(ShardedStateLoader._filter_subtensors(pieces))


def test_recording_keeps_no_replaced_weight_alive(store: Store) -> None:
    loader = _loader(sllm_write_back="sync")
    model = loader._any_tp_path(_source(store), WANT, PlannedLM, CPU)
    assert loader._candidates is not None
    ref = loader._candidates.by_name["o_proj.weight"][1]
    assert ref() is None  # post-processing replaced it: freed, as without the recording
    assert loader._candidates.by_name["doubled.weight"][1]() is model.doubled.weight
