"""The protocol's messages written once: readiness states the native engine agrees on, the
tensor row codec, error kinds, op names and the per-process settings' one parser."""

from __future__ import annotations

import pytest

from sllmfs.core import config
from sllmfs.core.errors import BadInput, SidecarCannotCopy
from sllmfs.engine.native import lib
from sllmfs.protocol import messages
from sllmfs.protocol.messages import ErrorKind, Op, Readiness, TensorRef


def test_native_readiness_values_are_the_protocols() -> None:
    assert (lib.CHUNK_PENDING, lib.CHUNK_READY, lib.CHUNK_FAILED) == tuple(Readiness)
    assert list(Readiness) == [Readiness.PENDING, Readiness.READY, Readiness.FAILED]


def test_tensor_rows_round_trip_as_positional_lists() -> None:
    ref = TensorRef("model.embed.weight", "BF16", (32, 8), 1, 4096, 512)
    row = ref.encode()
    assert row == ["model.embed.weight", "BF16", [32, 8], 1, 4096, 512]  # protocol version 1's layout
    assert TensorRef.decode(row) == ref
    assert TensorRef.decode(tuple(row)) == ref  # the client reads arrays as tuples


def test_error_kinds_travel_as_names_and_come_back_as_types() -> None:
    reply = messages.error_reply(SidecarCannotCopy("no GPU here\nmore"))
    assert reply == {"ok": False, "error": "no GPU here", "kind": ErrorKind.CANNOT_COPY.value}
    with pytest.raises(SidecarCannotCopy, match="no GPU here"):
        messages.raise_for(reply)
    with pytest.raises(messages.SidecarError) as got:
        messages.raise_for({"ok": False, "error": "x", "kind": "SomethingNew"})
    assert got.value.kind is ErrorKind.SIDECAR
    assert messages.kind_of(BadInput("b")) is ErrorKind.BAD_INPUT
    assert messages.kind_of(KeyError("k")) is ErrorKind.SIDECAR
    assert set(messages.RAISES) == set(ErrorKind)


def test_every_op_but_hello_has_a_handler() -> None:
    from sllmfs.sidecar.ops import Ops

    ops = Ops(cache=None, ids=iter(()), status=None)  # type: ignore[arg-type]  # the table needs neither
    assert set(ops.table) == set(Op) - {Op.HELLO}
    assert ops.table["load_ipc"] == ops.op_load_ipc  # plain strings from the wire find their handler


@pytest.mark.parametrize("raw,want", [("1", True), ("TRUE", True), ("yes", True), ("on", True),
                                      ("0", False), ("off", False), ("no", False), ("", None)])
def test_env_flag_is_the_one_boolean_parser(monkeypatch: pytest.MonkeyPatch, raw: str, want: bool | None) -> None:
    monkeypatch.setenv("SLLMFS_TEST_FLAG", raw)
    assert config.env_flag("SLLMFS_TEST_FLAG", default=True) is (True if want is None else want)
    monkeypatch.setenv("SLLMFS_REGISTRATION_REQUIRED", raw or "off")
    assert config.load_settings().registration_required is bool(want)


def test_env_seconds_refuses_what_is_not_a_duration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLLMFS_REPLY_TIMEOUT", raising=False)
    assert config.env_seconds("SLLMFS_REPLY_TIMEOUT", 60.0) == 60.0
    monkeypatch.setenv("SLLMFS_REPLY_TIMEOUT", "2.5")
    assert config.env_seconds("SLLMFS_REPLY_TIMEOUT", 60.0) == 2.5
    for bad in ("soon", "0", "-1", "nan"):
        monkeypatch.setenv("SLLMFS_REPLY_TIMEOUT", bad)
        with pytest.raises(BadInput, match=f"SLLMFS_REPLY_TIMEOUT='{bad}' is not a number of seconds above 0"):
            config.env_seconds("SLLMFS_REPLY_TIMEOUT", 60.0)
