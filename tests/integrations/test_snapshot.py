"""Write-back's copy of a rank's state (sllmfs/integrations/common/snapshot.py): every tensor's bytes, in
one host buffer that outlives the call, whatever the dtype, shape or layout of the source."""

from __future__ import annotations

import gc
import logging

import pytest

torch = pytest.importorskip("torch")

from sllmfs.integrations.common.snapshot import ALIGN, snapshot  # noqa: E402


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "embed": torch.randn(300, 64, generator=g).to(torch.bfloat16),
        "odd": torch.randint(0, 255, (3, 5, 7), generator=g, dtype=torch.uint8),  # 105 bytes: next one unaligned
        "scale": torch.randn(1, generator=g, dtype=torch.float32),
        "empty": torch.empty(0, 16, dtype=torch.float16),
        "mask": torch.rand(33, generator=g) > 0.5,
        "ids": torch.arange(1000, dtype=torch.int64),
        "transposed": torch.randn(40, 24, generator=g).t(),  # not contiguous
        "big": torch.randn(3 << 20, generator=g),  # 12 MiB: spans several of the faulting threads' parts
    }


def test_every_tensor_copied_exactly_into_one_buffer():
    state = _state()
    snap = snapshot(state, threads=4)
    assert list(snap) == list(state)
    base = None
    for name, t in state.items():
        got = snap[name]
        assert got.device.type == "cpu" and got.dtype == t.dtype and got.shape == t.shape, name
        assert got.is_contiguous(), name
        assert torch.equal(got, t), name
        if got.numel():
            assert got.data_ptr() % ALIGN == 0, name  # every dtype may view it
            owner = got.untyped_storage().data_ptr()
            base = base or owner
            assert owner == base, f"{name}: not in the one buffer"
    snap["ids"][0] = -1  # a copy, not a view of the source
    assert state["ids"][0] == 0


def test_the_copies_outlive_the_call_and_the_collector():
    state = _state()
    snap = snapshot(state)
    expect = {name: t.clone() for name, t in state.items()}
    del state
    gc.collect()
    for name, t in expect.items():
        assert torch.equal(snap[name], t), name


def test_an_empty_state_and_one_of_empty_tensors():
    assert snapshot({}) == {}
    snap = snapshot({"a": torch.empty(0), "b": torch.empty(2, 0, dtype=torch.bfloat16)})
    assert snap["a"].shape == (0,) and snap["b"].shape == (2, 0) and snap["b"].dtype == torch.bfloat16


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the GPU machine)")


def _not_registered(t: torch.Tensor) -> bool:
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    cuda.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
    return cuda.cuMemHostUnregister(t.untyped_storage().data_ptr()) == 713  # CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED


@needs_cuda
def test_a_gpu_state_is_copied_pinned_and_the_pin_let_go():
    state = {name: t.cuda() for name, t in _state().items()}
    snap = snapshot(state)
    for name, t in state.items():
        assert snap[name].device.type == "cpu" and torch.equal(snap[name], t.cpu()), name
    assert _not_registered(snap["big"])


@needs_cuda
def test_a_refused_pin_copies_pageable_and_leaves_no_error_behind(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture):
    from sllmfs.integrations.common import snapshot as snap_mod

    caplog.set_level(logging.INFO, logger=snap_mod.log.name)
    monkeypatch.setattr(snap_mod._Pin, "PORTABLE", 0x40000000)  # no such flag: the driver refuses it
    state = {name: t.cuda() for name, t in _state().items()}
    snap = snapshot(state)
    assert "would not pin" in caplog.text and "pageable" in caplog.text
    for name, t in state.items():
        assert torch.equal(snap[name], t.cpu()), name
    x = torch.ones(1 << 20, device="cuda").t().contiguous() * 2  # kernels launched after it are not blamed
    torch.cuda.synchronize()
    assert float(x.sum()) == 2 * (1 << 20)


def test_without_a_driver_nothing_is_pinned_and_nothing_to_release(caplog: pytest.LogCaptureFixture):
    import ctypes.util

    import numpy as np

    from sllmfs.integrations.common.snapshot import _Pin

    if ctypes.util.find_library("cuda"):
        pytest.skip("this host has a CUDA driver")
    caplog.set_level(logging.INFO, logger="sllmfs.integrations.snapshot")
    pin = _Pin(np.zeros(1 << 16, dtype=np.uint8))
    assert pin.done is False and "no driver API here" in caplog.text
    pin.release()  # nothing registered: nothing to undo
