"""The S3 origin against a real S3 server process on localhost (moto's server mode, started here)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")
torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from sllmfs.core.errors import BadInput, Corrupt, NotFound  # noqa: E402
from sllmfs.origin import client as s3  # noqa: E402
from sllmfs.origin.fetch import ensure_local, in_origin, origin_holds  # noqa: E402
from sllmfs.origin.pull import plan_pull, pull_dir, run_pull  # noqa: E402
from sllmfs.origin.push import push_model  # noqa: E402
from sllmfs.origin.url import INDEX, Origin, parse  # noqa: E402
from sllmfs.store.save import save_model  # noqa: E402
from sllmfs.store.store import Store  # noqa: E402
from tests.support.cli import one_line_error, sllmfs  # noqa: E402
from tests.support.sidecar import sidecar, wait_log  # noqa: E402

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
MODEL = "org/odd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **CREDS, **(extra_env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {url}") from None
            time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    proc, url = _start_server()
    try:
        yield url
    finally:
        _stop(proc)


@pytest.fixture
def env(server: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """AWS credentials and the endpoint, as a user sets them, for this process and the CLI."""
    values = {**CREDS, "SLLMFS_ORIGIN_ENDPOINT": server}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return values


@pytest.fixture
def origin(env: dict[str, str]) -> Origin:
    bucket = "b-" + uuid.uuid4().hex[:12]
    boto3.client("s3", endpoint_url=env["SLLMFS_ORIGIN_ENDPOINT"]).create_bucket(Bucket=bucket)
    return parse(f"s3://{bucket}/fleet/models", env["SLLMFS_ORIGIN_ENDPOINT"])


def _bucket(origin: Origin):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=origin.endpoint_url)


def _random(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * torch.empty(0, dtype=dtype).element_size(),), dtype=torch.uint8)
    return (raw % 2 if dtype == torch.bool else raw).view(dtype).reshape(shape)


@pytest.fixture(scope="module")
def odd_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards with odd dtypes (FP8, bool, 0-d, empty) and one 24 MiB tensor: a multipart object of
    two parts and two ranged GETs (16 MiB parts), so every transfer path runs."""
    src = tmp_path_factory.mktemp("odd")
    torch.manual_seed(0)
    save_file({"big": _random(torch.float32, (6, 1 << 20)), "f8": _random(torch.float8_e4m3fn, (7, 3)),
               "flags": _random(torch.bool, (5,))}, src / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({"scalar": torch.tensor(3.5), "empty": torch.empty(0, 4, dtype=torch.bfloat16),
               "e5": _random(torch.float8_e5m2, (3, 3)), "i64": _random(torch.int64, (9,))},
              src / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "tokenizer_config.json").write_text("{}")
    return src


@pytest.fixture
def stored(tmp_path: Path, odd_ckpt: Path) -> Store:
    store = Store(tmp_path / "store")
    save_model(store, MODEL, odd_ckpt, partition_target=1 << 20)  # several partitions
    return store


def _flip_in_origin(stored: Store, origin: Origin, at: int) -> Any:
    """One bit flipped at byte ``at`` of the origin's copy of the biggest partition (its object
    keeps size and metadata, so only the windows' checksums can tell); returns that partition."""
    big = max(stored.get(MODEL).manifest("hf").partitions, key=lambda p: p.size)
    key = origin.key(MODEL, f"variants/hf/{big.file}")
    bucket = _bucket(origin)
    head = bucket.head_object(Bucket=origin.bucket, Key=key)
    data = bytearray(bucket.get_object(Bucket=origin.bucket, Key=key)["Body"].read())
    data[at] ^= 0xFF
    bucket.put_object(Bucket=origin.bucket, Key=key, Body=bytes(data), Metadata=head["Metadata"])
    return big


def _committed(store: Store, name: str, timeout: float = 30) -> Store:
    """``store`` once ``name`` is in it: a streamed pull makes the lease ready before it commits to disk."""
    deadline = time.monotonic() + timeout
    while not store.has(name):
        assert time.monotonic() < deadline, f"{name} was not committed to {store.root}"
        time.sleep(0.05)
    return store


def _status_of(c: Any, name: str) -> dict[str, Any]:
    (m,) = [m for m in c.status()["models"] if m["name"] == name]
    return dict(m)


def _snapshot(store: Store, name: str) -> dict[str, bytes]:
    """Every file of a stored model, by path under its directory."""
    root = store.model_path(name)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_push_then_pull_gives_the_same_bytes(stored: Store, origin: Origin, env: dict[str, str],
                                             tmp_path: Path) -> None:
    pushed = sllmfs("push", "--model", MODEL, "--to", str(origin), store=stored.root, env=env)
    assert pushed.stdout.startswith(f"pushed {MODEL} to {origin}:")
    again = sllmfs("push", "--model", MODEL, "--to", str(origin), store=stored.root, env=env)
    assert "sent 0 B" in again.stdout  # every object already there: nothing sent

    fresh = tmp_path / "fresh"
    pulled = sllmfs("pull", "--model", MODEL, "--from", str(origin), store=fresh, env=env)
    assert pulled.stdout.startswith(f"pulled {MODEL} from {origin}:") and "verified" in pulled.stdout
    assert _snapshot(Store(fresh), MODEL) == _snapshot(stored, MODEL)
    info = Store(fresh).get(MODEL)
    assert info.manifest("hf") == stored.get(MODEL).manifest("hf") and len(info.manifest("hf").partitions) >= 2
    sllmfs("verify", "--model", MODEL, store=fresh)
    assert not pull_dir(Store(fresh), MODEL).exists()  # the work folder became the model
    keys = {o["Key"] for o in _bucket(origin).list_objects_v2(Bucket=origin.bucket)["Contents"]}
    assert origin.key(MODEL, INDEX) in keys and not any("/.uploads/" in k for k in keys)


def test_pull_into_a_store_that_has_the_model_needs_force(stored: Store, origin: Origin,
                                                          env: dict[str, str]) -> None:
    push_model(stored, MODEL, origin)
    line = one_line_error(sllmfs("pull", "--model", MODEL, "--from", str(origin), store=stored.root, env=env,
                                 check=False))
    assert "already in the store" in line and "--force" in line
    before = stored.get(MODEL).manifest("hf")
    sllmfs("pull", "--model", MODEL, "--from", str(origin), "--force", store=stored.root, env=env)
    assert stored.get(MODEL).manifest("hf") == before


class _Stop(BaseException):
    """Stands for Ctrl-C / a kill in the middle of a transfer."""


def _stop_after(nbytes: int):  # type: ignore[no-untyped-def]
    seen = [0]
    lock = threading.Lock()

    def progress(n: int) -> None:
        with lock:
            seen[0] += n
            if seen[0] > nbytes:
                raise _Stop

    return progress


def test_interrupted_push_is_invisible_and_resumes(stored: Store, origin: Origin, tmp_path: Path) -> None:
    with pytest.raises(_Stop):
        push_model(stored, MODEL, origin, threads=2, progress=_stop_after(18 << 20))
    with pytest.raises(NotFound, match="is not in origin"):  # no index: a half push is not a model
        ensure_local(Store(tmp_path / "other"), MODEL, origin)
    keys = {o["Key"] for o in _bucket(origin).list_objects_v2(Bucket=origin.bucket).get("Contents", [])}
    assert any("/.uploads/" in k for k in keys)  # the big partition's multipart upload, left to resume

    result = push_model(stored, MODEL, origin, threads=2)
    assert result.skipped > 0 and 0 < result.bytes_sent < result.bytes_total
    fresh = Store(tmp_path / "fresh")
    assert ensure_local(fresh, MODEL, origin)
    assert _snapshot(fresh, MODEL) == _snapshot(stored, MODEL)


def test_killed_pull_publishes_nothing_and_resumes(stored: Store, origin: Origin, tmp_path: Path) -> None:
    push_model(stored, MODEL, origin)
    fresh = Store(tmp_path / "fresh")
    client = s3.connect(origin)
    plan = plan_pull(client, origin, MODEL)
    with pytest.raises(_Stop):
        run_pull(fresh, plan, client, threads=1, progress=_stop_after(17 << 20))
    assert not fresh.has(MODEL) and pull_dir(fresh, MODEL).is_dir()
    result = run_pull(Store(fresh.root), plan_pull(client, origin, MODEL), client, threads=2)
    assert result.published and result.bytes_resumed >= 16 << 20
    assert result.bytes_fetched + result.bytes_resumed == result.bytes_total
    assert _snapshot(fresh, MODEL) == _snapshot(stored, MODEL)


def test_corrupt_object_is_refused_in_one_line_and_nothing_is_stored(stored: Store, origin: Origin,
                                                                     env: dict[str, str], tmp_path: Path) -> None:
    push_model(stored, MODEL, origin)
    big = _flip_in_origin(stored, origin, 20 << 20)  # in the second part, same size, same metadata

    fresh = tmp_path / "fresh"
    line = one_line_error(sllmfs("pull", "--model", MODEL, "--from", str(origin), store=fresh, env=env,
                                 check=False))
    assert "fail their checksum" in line and big.file in line and "--force" in line
    assert sllmfs("ls", "--json", store=fresh).stdout.strip() == "[]"

    sllmfs("push", "--model", MODEL, "--to", str(origin), "--force", store=stored.root, env=env)  # the repair
    sllmfs("pull", "--model", MODEL, "--from", str(origin), store=fresh, env=env)
    assert _snapshot(Store(fresh), MODEL) == _snapshot(stored, MODEL)


def test_tampered_index_is_refused(stored: Store, origin: Origin, tmp_path: Path) -> None:
    push_model(stored, MODEL, origin)
    key = origin.key(MODEL, INDEX)
    bucket = _bucket(origin)
    index = json.loads(bucket.get_object(Bucket=origin.bucket, Key=key)["Body"].read())
    index["objects"]["../../escape"] = {"size": 1, "digest": "0" * 16, "partition": False}
    bucket.put_object(Bucket=origin.bucket, Key=key, Body=json.dumps(index).encode())
    with pytest.raises(Corrupt, match="not a file sllmfs stores"):
        ensure_local(Store(tmp_path / "fresh"), MODEL, origin)


def test_missing_model_bucket_and_endpoint_are_one_line_each(origin: Origin, env: dict[str, str],
                                                              tmp_path: Path) -> None:
    store = tmp_path / "s"
    line = one_line_error(sllmfs("pull", "--model", "org/none", "--from", str(origin), store=store, env=env,
                                 check=False))
    assert "'org/none' is not in origin" in line and "sllmfs push" in line
    line = one_line_error(sllmfs("pull", "--model", MODEL, "--from", "s3://no-such-bucket-here/x", store=store,
                                 env=env, check=False))
    assert "bucket 'no-such-bucket-here' does not exist" in line
    line = one_line_error(sllmfs("pull", "--model", MODEL, "--from", "http://x/y", store=store, env=env,
                                 check=False))
    assert "not an s3:// URL" in line
    dead = f"http://127.0.0.1:{_free_port()}"
    line = one_line_error(sllmfs("pull", "--model", MODEL, "--from", str(origin), "--endpoint-url", dead,
                                 store=store, env={**env, "AWS_MAX_ATTEMPTS": "1"}, check=False))
    assert "cannot reach origin" in line
    line = one_line_error(sllmfs("push", "--model", MODEL, "--to", str(origin), store=store, env=env, check=False))
    assert "not in the store" in line


def test_wrong_credentials_are_one_line(tmp_path: Path, stored: Store) -> None:
    proc, url = _start_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # this server checks every key
    try:
        env = {**CREDS, "AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000", "SLLMFS_ORIGIN_ENDPOINT": url}
        line = one_line_error(sllmfs("push", "--model", MODEL, "--to", "s3://bkt/p", store=stored.root, env=env,
                                     check=False))
        assert "refused the credentials" in line and "AWS_ACCESS_KEY_ID" in line
    finally:
        _stop(proc)


def test_ensure_local_pulls_once_for_concurrent_callers(stored: Store, origin: Origin, tmp_path: Path) -> None:
    push_model(stored, MODEL, origin)
    fresh = Store(tmp_path / "fresh")
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_local(fresh, MODEL, origin)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True]
    assert not ensure_local(fresh, MODEL, origin)  # present: nothing to do
    assert _snapshot(fresh, MODEL) == _snapshot(stored, MODEL)
    with pytest.raises(NotFound, match="push it from a node"):
        ensure_local(fresh, "org/absent", origin)


def test_in_origin_knows_models_and_their_namespaces(stored: Store, origin: Origin) -> None:
    assert not in_origin(origin, MODEL) and not in_origin(origin, "org")
    push_model(stored, MODEL, origin)
    assert in_origin(origin, MODEL) and in_origin(origin, "org")  # the mount looks up "org" before "org/odd"
    assert not in_origin(origin, "or") and not in_origin(origin, "org/od")


def test_origin_holds_only_this_very_model(stored: Store, origin: Origin, odd_ckpt: Path, tmp_path: Path) -> None:
    assert not origin_holds(stored, MODEL, origin)  # not pushed yet
    push_model(stored, MODEL, origin)
    assert origin_holds(stored, MODEL, origin)
    # a framework variant written back locally is regenerable: the origin still holds the model
    info = stored.get(MODEL)
    extra = tmp_path / "extra"
    import shutil

    shutil.copytree(info.variant_dir("hf"), extra)
    with stored.writing(MODEL), stored.staging() as work:
        os.rename(extra, work / "v")
        stored.commit_variant(work / "v", MODEL, "sglang.tp1.r0.bf16.none.v0517", force=False)
    assert origin_holds(stored, MODEL, origin)
    # saved again (new model.json): the origin's copy is another version, the local one must stay
    save_model(stored, MODEL, odd_ckpt, force=True, partition_target=1 << 20)
    assert not origin_holds(stored, MODEL, origin)
    dead = Origin(origin.bucket, origin.prefix, f"http://127.0.0.1:{_free_port()}")
    assert not origin_holds(stored, MODEL, dead)  # unreachable: keep it


def test_origin_url_parsing() -> None:
    o = parse("s3://my-bucket/a/b/", "http://h:9000")
    assert (o.bucket, o.prefix, o.endpoint_url) == ("my-bucket", "a/b", "http://h:9000")
    assert o.key("org/m", "model.json") == "a/b/org%2Fm/model.json"
    assert parse("s3://my-bucket").key("m", INDEX) == f"m/{INDEX}"
    for bad in ("s3://UPPER/x", "s3://b", "s3://bucket/a//b", "s3://bucket/../x", "gs://bucket/x"):
        with pytest.raises(BadInput):
            parse(bad)
    with pytest.raises(BadInput, match="not an http"):
        parse("s3://bucket/x", "ftp://h")
    assert s3.part_size(10) == s3.PART and s3.part_size(200_000 << 20) % (4 << 20) == 0
    assert s3.part_size(200_000 << 20) * s3.MAX_PARTS >= 200_000 << 20


def test_start_refuses_a_bad_origin_in_one_line(tmp_path: Path) -> None:
    line = one_line_error(sllmfs("start", "--origin", "gs://bucket/x", "--socket", str(tmp_path / "s.sock"),
                                 store=tmp_path / "store", check=False))
    assert "not an s3:// URL" in line
    line = one_line_error(sllmfs("start", "--origin", "s3://bucket/x", "--origin-endpoint", "minio:9000",
                                 "--socket", str(tmp_path / "s.sock"), store=tmp_path / "store", check=False))
    assert "not an http(s) URL" in line


def test_sidecar_pulls_a_missing_model_and_says_the_origin_holds_it(stored: Store, origin: Origin,
                                                                     env: dict[str, str], tmp_path: Path) -> None:
    """`start --origin`: a node whose store lacks the model pulls it (verified) on the first acquire and
    serves the same bytes; status says the origin holds it, so the disk budget may evict it."""
    push_model(stored, MODEL, origin)
    node = tmp_path / "node"
    with sidecar(tmp_path, "--origin", str(origin), env=env, store=node) as sd, sd.connect() as c:
        with c.acquire(MODEL) as lease:
            lease.wait(timeout=60)
        assert _snapshot(_committed(Store(node), MODEL), MODEL) == _snapshot(stored, MODEL)
        deadline = time.monotonic() + 10  # the sidecar notes the origin's copy right after the commit
        while not (m := _status_of(c, MODEL))["origin_copy"] and time.monotonic() < deadline:
            time.sleep(0.05)
        st = c.status()
        assert m["origin_copy"] and m["disk_evictable"] and st["origin"] == str(origin)
        with pytest.raises(NotFound, match="'org/absent'"):  # in neither place: one error, the daemon goes on
            c.acquire("org/absent")
        assert c.acquire(MODEL).model == MODEL


def test_disk_budget_evicts_a_local_folder_model_only_once_the_origin_holds_it(stored: Store, origin: Origin) -> None:
    from sllmfs.sidecar import disktier

    def held(name: str) -> bool:
        return origin_holds(stored, name, origin)

    assert disktier.enforce_budget(stored, 1, set(), held) == []  # saved from a folder, origin empty: kept
    assert stored.has(MODEL)
    push_model(stored, MODEL, origin)
    assert disktier.enforce_budget(stored, 1, {MODEL}, held) == []  # leased or mounted: kept
    assert disktier.enforce_budget(stored, 1, set(), held) == [MODEL] and not stored.has(MODEL)


def test_the_mount_pulls_a_model_on_lookup(stored: Store, origin: Origin, env: dict[str, str], odd_ckpt: Path,
                                           tmp_path: Path) -> None:
    """`start --origin --mount`: a path under the mount that names an origin model pulls it (verified)
    before the lookup answers; its files read as the checkpoint's; a name in neither is ENOENT."""
    from safetensors.torch import load_file

    from tests.support.fuse import force_unmount

    push_model(stored, MODEL, origin)
    mnt, node = tmp_path / "mnt", tmp_path / "node"
    mnt.mkdir()
    try:
        with sidecar(tmp_path, "--origin", str(origin), "--mount", str(mnt), env=env, store=node):
            deadline = time.monotonic() + 30
            while not (mnt / ".sllmfs.json").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not Store(node).has(MODEL)
            assert not (mnt / "org" / "absent").exists()
            assert json.loads((mnt / MODEL / "config.json").read_text()) == {"model_type": "llama"}
            assert Store(node).has(MODEL)
            want = {k: v for shard in odd_ckpt.glob("*.safetensors") for k, v in load_file(shard).items()}
            got = {k: v for f in (mnt / MODEL).glob("*.safetensors") for k, v in load_file(f).items()}
            def raw(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:  # random bits hold NaNs: compare bytes
                return str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()

            assert {k: raw(v) for k, v in want.items()} == {k: raw(v) for k, v in got.items()}
    finally:
        force_unmount(mnt)


def test_push_refuses_rotted_local_bytes(stored: Store, origin: Origin, env: dict[str, str]) -> None:
    """Push checks every window it sends: the origin never holds (and the disk budget never trusts)
    a copy of bytes that fail the manifest."""
    part = stored.model_path(MODEL) / "variants" / "hf" / stored.get(MODEL).manifest("hf").partitions[0].file
    with open(part, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    line = one_line_error(sllmfs("push", "--model", MODEL, "--to", str(origin), store=stored.root, env=env,
                                 check=False))
    assert "fails its checksum" in line and "verify" in line
    assert s3.get_json_or_none(_bucket(origin), origin.bucket, origin.key(MODEL, INDEX)) is None
    assert not origin_holds(stored, MODEL, origin)


def test_disk_budget_keeps_a_model_replaced_since_it_was_pushed(stored: Store, origin: Origin, odd_ckpt: Path,
                                                                tmp_path: Path) -> None:
    from sllmfs.sidecar import disktier

    push_model(stored, MODEL, origin)
    other = tmp_path / "other"
    other.mkdir()
    save_file({"w": torch.ones(3)}, other / "model.safetensors")
    (other / "config.json").write_text("{}")
    save_model(stored, MODEL, other, force=True)  # the origin holds the old version, not this one
    assert disktier.enforce_budget(stored, 1, set(), lambda n: origin_holds(stored, n, origin)) == []
    assert stored.has(MODEL)


def test_acquire_of_a_model_in_the_origin_is_answered_at_once(stored: Store, origin: Origin, env: dict[str, str],
                                                              tmp_path: Path) -> None:
    """The reply never waits out a download: the first says Pulling (the client asks again)."""
    from sllmfs.protocol import wire
    from tests.support.sidecar import raw_hello

    push_model(stored, MODEL, origin)
    with sidecar(tmp_path, "--origin", str(origin), env=env, store=tmp_path / "node") as sd:
        s = raw_hello(sd.socket)
        t0 = time.monotonic()
        wire.send(s, {"op": "acquire", "model": MODEL})
        reply, _fds = wire.recv(s)
        assert time.monotonic() - t0 < 5 and reply["kind"] == "Pulling" and "being pulled" in reply["error"]
        s.close()


def test_a_model_removed_after_its_pull_is_pulled_again(stored: Store, origin: Origin, env: dict[str, str],
                                                        tmp_path: Path) -> None:
    """A finished pull is not remembered: once the model is gone again (evicted, rm), the next
    acquire pulls it again instead of answering NotFound."""
    push_model(stored, MODEL, origin)
    node = tmp_path / "node"
    with sidecar(tmp_path, "--origin", str(origin), env=env, store=node) as sd, sd.connect() as c:
        with c.acquire(MODEL) as lease:
            lease.wait(timeout=60)
        _committed(Store(node), MODEL).remove(MODEL)
        with c.acquire(MODEL) as lease:
            lease.wait(timeout=60)
        assert _snapshot(_committed(Store(node), MODEL), MODEL) == _snapshot(stored, MODEL)


def _partition_bytes(store: Store, name: str) -> list[bytes]:
    info = store.get(name)
    folder = store.variant_path(name, "hf")
    return [(folder / p.file).read_bytes() for p in info.manifest("hf").partitions]


def test_a_pull_streams_into_the_memory_tier(stored: Store, origin: Origin, env: dict[str, str],
                                              tmp_path: Path) -> None:
    """The acquire that starts a pull gets the model from memory as it downloads: each verified range
    lands in the tier as it arrives (no second read from disk), and the copy is then an ordinary hit."""
    push_model(stored, MODEL, origin)
    node = tmp_path / "node"
    with sidecar(tmp_path, "--origin", str(origin), env=env, store=node) as sd, sd.connect() as c:
        with c.acquire(MODEL) as lease:
            lease.wait(timeout=60)
            got = [bytes(b) for b in lease.buffers()]
        assert got == _partition_bytes(stored, MODEL)
        log = wait_log(sd, "streamed from the origin")
        assert "streams into memory" in log and "(streamed from the origin)" in log
        assert "fill started" not in log  # the tier was never filled from the disk copy
        with c.acquire(MODEL) as lease:  # a hit on the streamed copy, now known by its stored identity
            assert lease.ready()
        assert "fill started" not in sd.log()
    assert _snapshot(_committed(Store(node), MODEL), MODEL) == _snapshot(stored, MODEL)


def test_a_damaged_object_fails_the_streamed_lease_and_stores_nothing(stored: Store, origin: Origin,
                                                                      env: dict[str, str], tmp_path: Path) -> None:
    push_model(stored, MODEL, origin)
    _flip_in_origin(stored, origin, -10)  # near the end: earlier ranges stream in first
    node = tmp_path / "node"
    with sidecar(tmp_path, "--origin", str(origin), env=env, store=node) as sd, sd.connect() as c:
        with pytest.raises(Corrupt):
            with c.acquire(MODEL) as lease:  # either the acquire or the wait learns it
                lease.wait(timeout=60)
        assert not Store(node).has(MODEL)
        with pytest.raises(Corrupt, match="fail their checksum"):  # remembered for a while: one line
            c.acquire(MODEL)
        assert all(m["name"] != MODEL for m in c.status()["models"])  # nothing stored, the daemon answers


# -- metadata files: checked against model.json's digests on the way out and in ----------------------


def test_push_refuses_a_damaged_metadata_file_before_uploading_anything(stored: Store, origin: Origin,
                                                                        env: dict[str, str]) -> None:
    path = stored.get(MODEL).files_dir / "config.json"
    data = bytearray(path.read_bytes())
    data[3] ^= 0x20
    path.write_bytes(bytes(data))
    line = one_line_error(sllmfs("push", "--model", MODEL, "--to", str(origin), store=stored.root, env=env,
                                 check=False))
    assert "files/config.json fails its xxh3_64 checksum" in line and MODEL in line
    assert "Contents" not in _bucket(origin).list_objects_v2(Bucket=origin.bucket)  # nothing went up


def _replace_in_origin(origin: Origin, rel: str, body: bytes) -> None:
    """An origin object replaced together with its index entry (a pusher that read bad bytes, or a
    hand): the index's own checksums agree, only the digests recorded at save can tell."""
    from sllmfs.store.format import digest

    bucket = _bucket(origin)
    bucket.put_object(Bucket=origin.bucket, Key=origin.key(MODEL, rel), Body=body)
    key = origin.key(MODEL, INDEX)
    index = json.loads(bucket.get_object(Bucket=origin.bucket, Key=key)["Body"].read())
    index["objects"][rel] = {"size": len(body), "digest": digest(body), "partition": False}
    bucket.put_object(Bucket=origin.bucket, Key=key, Body=json.dumps(index).encode())


@pytest.mark.parametrize("body", [b'{"model_type": "llamb"}', b'{"model_type": "llama"} ', b"{}"],
                         ids=["flipped", "extended", "truncated"])
def test_pull_refuses_metadata_that_differs_from_its_record_and_keeps_the_local_copy(
        stored: Store, origin: Origin, env: dict[str, str], body: bytes) -> None:
    push_model(stored, MODEL, origin)
    _replace_in_origin(origin, "files/config.json", body)
    before = _snapshot(stored, MODEL)
    line = one_line_error(sllmfs("pull", "--model", MODEL, "--from", str(origin), "--force", store=stored.root,
                                 env=env, check=False))
    assert "files/config.json does not match the size and xxh3_64 recorded" in line and "--force" in line
    assert _snapshot(stored, MODEL) == before  # the previous local copy, untouched
    assert not pull_dir(stored, MODEL).exists() or not any(pull_dir(stored, MODEL).rglob("config.json"))


def test_a_model_saved_before_digests_goes_through_the_origin_unverified(stored: Store, origin: Origin,
                                                                         env: dict[str, str], tmp_path: Path) -> None:
    from tests.store.test_metafiles import make_legacy

    make_legacy(stored, MODEL)
    pushed = sllmfs("push", "--model", MODEL, "--to", str(origin), store=stored.root, env=env)
    assert "served unverified" in pushed.stderr and "--repair" in pushed.stderr
    fresh = tmp_path / "fresh"
    sllmfs("pull", "--model", MODEL, "--from", str(origin), store=fresh, env=env)
    assert _snapshot(Store(fresh), MODEL) == _snapshot(stored, MODEL)
    assert Store(fresh).get(MODEL).file_digests is None
    sllmfs("verify", "--model", MODEL, "--repair", store=fresh)
    assert Store(fresh).get(MODEL).meta_files().verified


def test_disk_budget_keeps_a_model_whose_origin_object_was_replaced(stored: Store, origin: Origin) -> None:
    """The origin's index is not enough: an object replaced since (a straggling or concurrent push of
    another version) makes the origin's copy unusable, so the local one is the only good one: kept."""
    from sllmfs.sidecar import disktier

    push_model(stored, MODEL, origin)
    assert origin_holds(stored, MODEL, origin)
    part = stored.model_path(MODEL) / "variants" / "hf" / stored.get(MODEL).manifest("hf").partitions[0].file
    _bucket(origin).put_object(Bucket=origin.bucket, Key=origin.key(MODEL, f"variants/hf/{part.name}"),
                               Body=b"\0" * part.stat().st_size)  # same size, no digest of ours
    assert not origin_holds(stored, MODEL, origin)
    assert disktier.enforce_budget(stored, 1, set(), lambda n: origin_holds(stored, n, origin)) == []
    assert stored.has(MODEL)


def test_a_pull_interrupted_while_it_commits_resumes(stored: Store, origin: Origin, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or a failing fsync) during the commit keeps the verified pull: the next one resumes it."""
    import sllmfs.store.store as store_module

    push_model(stored, MODEL, origin)
    fresh, client = Store(tmp_path / "fresh"), s3.connect(origin)
    real = store_module.fsync_tree

    def interrupted(path: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "fsync_tree", interrupted)  # inside the commit, after the pull's own
    with pytest.raises(KeyboardInterrupt):
        run_pull(fresh, plan_pull(client, origin, MODEL), client)
    monkeypatch.setattr(store_module, "fsync_tree", real)
    assert not fresh.has(MODEL) and pull_dir(fresh, MODEL).is_dir()
    result = run_pull(Store(fresh.root), plan_pull(client, origin, MODEL), client)
    assert result.published and result.bytes_fetched == 0 and result.bytes_resumed == result.bytes_total
    assert _snapshot(fresh, MODEL) == _snapshot(stored, MODEL)


def test_an_old_clients_pull_stores_a_model_it_cannot_read_without_memory(origin: Origin, env: dict[str, str],
                                                                          tmp_path: Path) -> None:
    """A client older than HELLO_OFF_ELEMENT asking for a model whose tensors sit off their element size
    (a .bin checkpoint stored as safetensors files) starts its pull, which stores the model but reserves
    no memory for it (that client will be refused it); the refusal is one line, and the sidecar serves on."""
    from sllmfs.protocol import wire
    from tests.support.sidecar import raw_hello

    src = tmp_path / "bin"
    src.mkdir()
    torch.save({"flags": torch.tensor([True, False, True, True, False, True, False]),
                "w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, src / "pytorch_model.bin")
    local = Store(tmp_path / "local")
    assert save_model(local, "org/oddbin", src).off_element
    push_model(local, "org/oddbin", origin)
    node = tmp_path / "node"
    with sidecar(tmp_path, "--origin", str(origin), env=env, store=node) as sd, raw_hello(sd.socket) as old:
        wire.send(old, {"op": "acquire", "model": "org/oddbin"})
        assert wire.recv(old)[0]["kind"] == "Pulling"
        _committed(Store(node), "org/oddbin")
        with sd.connect() as c:
            m = _status_of(c, "org/oddbin")
            assert m["tier"] == "disk" and m["variants"] == [] and c.status()["memory"]["used"] == 0, m
        wire.send(old, {"op": "acquire", "model": "org/oddbin"})
        reply = wire.recv(old)[0]
        assert reply["ok"] is False and "off their element size" in reply["error"], reply
        with sd.connect() as c, c.acquire("org/oddbin") as lease:  # a current client is served
            assert torch.equal(lease.tensors(timeout=30)["w"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
