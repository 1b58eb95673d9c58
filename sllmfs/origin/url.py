"""Where a model lives in the origin: ``s3://bucket/prefix`` plus the endpoint to reach it.

Object layout under ``<prefix>/<quoted model name>/`` mirrors the store's model directory
(``model.json``, ``files/...``, ``variants/<key>/...``) plus ``sllmfs-origin.json``, the index
written last: a model without it is not (yet) in the origin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sllmfs.core import names
from sllmfs.core.errors import BadInput

INDEX = "sllmfs-origin.json"
UPLOADS = ".uploads"  # resumable multipart uploads in flight: <model>/.uploads/<rel>.json
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class Origin:
    bucket: str
    prefix: str  # "" or "a/b" (no leading or trailing '/')
    endpoint_url: str | None = None  # None: what the AWS SDK finds (AWS_ENDPOINT_URL, profile, AWS)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def model_prefix(self, model: str) -> str:
        """The key prefix (ending in '/') of a model's objects; the name quoted as the store quotes it."""
        quoted = names.model_dirname(model)
        return f"{self.prefix}/{quoted}/" if self.prefix else f"{quoted}/"

    def key(self, model: str, rel: str) -> str:
        return self.model_prefix(model) + rel

    def where(self, model: str, rel: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(model, rel)}"


def parse(url: str, endpoint_url: str | None = None) -> Origin:
    """``s3://bucket[/prefix]`` -> Origin. ``endpoint_url`` comes from Settings.origin_endpoint (flag,
    $SLLMFS_ORIGIN_ENDPOINT, config file); empty: the AWS SDK's own (AWS_ENDPOINT_URL, profile)."""
    if not url.startswith("s3://"):
        raise BadInput(f"origin {url!r} is not an s3:// URL; write it as s3://bucket/prefix")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not _BUCKET.match(bucket):
        raise BadInput(f"origin {url!r}: {bucket!r} is not a bucket name (3-63 lowercase letters, digits, '.' "
                       "and '-'); write it as s3://bucket/prefix")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise BadInput(f"origin {url!r}: the prefix has an empty, '.' or '..' part; write it as s3://bucket/a/b")
    endpoint = endpoint_url or None
    if endpoint is not None and not re.match(r"^https?://[^/\s]+", endpoint):
        raise BadInput(f"origin endpoint {endpoint!r} is not an http(s) URL; write it as http://host:port")
    return Origin(bucket, prefix, endpoint)
