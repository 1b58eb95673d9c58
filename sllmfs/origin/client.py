"""The S3 client: boto3 (credentials, endpoint, signing and retries as every AWS SDK reads them),
and its errors turned into one line each."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

from sllmfs.core.errors import BadInput, NotFound, SllmfsError
from sllmfs.origin.url import Origin

PART = 16 << 20  # ranged GET and multipart part size: a multiple of the store's 4 MiB checksum window
MAX_PARTS = 10_000  # S3's limit on parts per upload
META_DIGEST = "xxh3"  # x-amz-meta-xxh3: what the object holds, so a re-run push can skip it

_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
               "ExpiredToken", "403", "Forbidden"}


def connect(origin: Origin, threads: int = 16) -> Any:
    """A boto3 S3 client for ``origin``, its connection pool as wide as the transfers run."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise BadInput("the origin needs boto3: pip install 'sllmfs[origin]' (or pip install boto3)") from None
    config = Config(max_pool_connections=threads + 4, retries={"max_attempts": 5, "mode": "standard"},
                    connect_timeout=10, read_timeout=120, user_agent_extra="sllmfs",
                    # MinIO, Ceph RGW and other self-hosted endpoints serve buckets by path
                    s3={"addressing_style": "path"} if origin.endpoint_url else {},
                    # only checksum when the operation needs it: the store's xxh3 windows verify the data
                    request_checksum_calculation="when_required", response_checksum_validation="when_required")
    try:
        return boto3.session.Session().client("s3", endpoint_url=origin.endpoint_url, config=config)
    except Exception as e:  # a bad profile or region in ~/.aws is the user's to fix
        raise BadInput(f"cannot set up the S3 client for origin {origin}: {e}; check AWS_PROFILE, "
                       "AWS_REGION and ~/.aws/config") from None


def part_size(size: int) -> int:
    """PART, or larger (in 4 MiB steps) where a partition would need more than MAX_PARTS parts."""
    step = 4 << 20
    need = -(-size // MAX_PARTS)
    return max(PART, -(-need // step) * step)


def ranges(size: int) -> list[tuple[int, int]]:
    """(offset, length) pieces of an object ``size`` bytes long, ``part_size`` each (the last shorter)."""
    step = part_size(size)
    return [(off, min(step, size - off)) for off in range(0, size, step)]


@contextmanager
def errors(origin: Origin, what: str) -> Iterator[None]:
    """Turn what boto3 raises into one line: what failed, where, what to do."""
    try:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )
    except ImportError:  # connect() already said so
        yield
        return
    endpoint = origin.endpoint_url or "the AWS default endpoint"
    try:
        yield
    except SllmfsError:
        raise
    except (NoCredentialsError, PartialCredentialsError):
        raise BadInput(f"no AWS credentials for origin {origin}: set AWS_ACCESS_KEY_ID and "
                       "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE") from None
    except EndpointConnectionError:
        raise BadInput(f"cannot reach origin {origin} at {endpoint} ({what}); check --endpoint-url, "
                       "$SLLMFS_ORIGIN_ENDPOINT or $AWS_ENDPOINT_URL") from None
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        msg = e.response.get("Error", {}).get("Message", "") or code
        if code == "NoSuchBucket":
            raise NotFound(f"bucket {origin.bucket!r} does not exist at {endpoint}; create it or fix the "
                           f"origin URL {origin}") from None
        if code in _AUTH_CODES:
            raise BadInput(f"origin {origin} at {endpoint} refused the credentials ({code}) while trying to "
                           f"{what}; check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE") from None
        raise BadInput(f"origin {origin}: {what} failed ({code}: {msg}); run it again, or check the "
                       "bucket's permissions") from None
    except BotoCoreError as e:
        raise BadInput(f"origin {origin}: {what} failed ({e}); run it again") from None


def head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's HEAD answer, or None where there is no such object."""
    from botocore.exceptions import ClientError

    try:
        return dict(client.head_object(Bucket=bucket, Key=key))
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def holds(client: Any, bucket: str, key: str, size: int, digest: str) -> bool:
    """Is the object there with these bytes, as a push wrote it (its size, and the digest push put in
    its metadata)? An index alone does not say: a straggling or concurrent push may have replaced it."""
    have = head(client, bucket, key)
    if have is None:
        return False
    return bool(have.get("ContentLength") == size and have.get("Metadata", {}).get(META_DIGEST) == digest)


def get_bytes(client: Any, bucket: str, key: str, offset: int | None = None, length: int | None = None) -> bytes:
    """A whole object, or ``length`` bytes of it from ``offset`` (a ranged GET)."""
    kw: dict[str, Any] = {}
    if offset is not None and length is not None:
        kw["Range"] = f"bytes={offset}-{offset + length - 1}"
    body = client.get_object(Bucket=bucket, Key=key, **kw)["Body"]
    try:
        return bytes(body.read())
    finally:
        body.close()


def get_json_or_none(client: Any, bucket: str, key: str) -> Any:
    """A small JSON object, or None where there is none (or it is not JSON: treated as absent)."""
    from botocore.exceptions import ClientError

    try:
        raw = get_bytes(client, bucket, key)
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    try:
        return json.loads(raw)
    except ValueError:
        return None


@contextmanager
def pool(threads: int, name: str) -> Iterator[Any]:
    """A thread pool that, on the way out, drops what has not started (Ctrl-C ends in one transfer's time)."""
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(max(1, threads), thread_name_prefix=name)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def wait_all(jobs: list[Any]) -> None:
    """Every job done, or the first failure (or Ctrl-C) raised once none is left running behind it:
    jobs not started yet are cancelled, so a corrupt object does not download the rest first."""
    try:
        futures.wait(jobs, return_when=futures.FIRST_EXCEPTION)
        for job in jobs:
            if job.done() and not job.cancelled() and job.exception() is not None:
                raise job.exception()
    finally:
        settle(jobs)


def settle(jobs: list[Any]) -> None:
    """Nothing left running: cancel what has not started, wait for what has (they use our fds)."""
    for job in jobs:
        job.cancel()
    futures.wait(jobs)
