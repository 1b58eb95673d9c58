"""Settings for every sllmfs command: flag > environment > TOML file > default.

Environment variables are ``SLLMFS_<SETTING>`` (``SLLMFS_STORAGE_PATH``,
``SLLMFS_SOCKET``, ``SLLMFS_MEM_POOL_SIZE`` ...). The TOML file is
``$SLLMFS_CONFIG``, else ``/etc/sllmfs/config.toml``; its keys are the flag
names with ``_`` (``storage_path = "/var/lib/sllmfs"``).
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sllmfs.core import cgroup
from sllmfs.core.errors import BadInput

COPY_DIRECT_CPUS = 8  # from this many CPUs on, GPU-first copies of uncached files read O_DIRECT (below)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str | int, what: str = "size") -> int:
    """'4GB' -> 4e9, '512MiB' -> 512*2**20, '0' -> 0 (unbounded where a budget allows it)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise BadInput(f"{what} {text!r} is not a size: write e.g. 4GB, 512MiB or 1073741824")
    return int(float(m.group(1)) * _UNITS[unit])


def _default_runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/sllmfs")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "sllmfs" if xdg else Path(f"/tmp/sllmfs-{os.getuid()}")


def _default_storage() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/sllmfs")
    return Path.home() / ".local" / "share" / "sllmfs"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, bounded by its cgroups' CPU quotas (a pod's limit),
    not the host's count (os.cpu_count() says 128 in a pod allowed 4)."""
    n = len(os.sched_getaffinity(0))
    quota = cgroup.cpu_limit()
    return n if quota is None else min(n, quota)


@dataclass
class Settings:
    storage_path: str = ""
    socket: str = ""
    mount: str = ""
    # reads per fill: from the page cache a fill is bound by faulting in fresh pages (2.5 GB/s a
    # thread on the H200 VM, bench/NOTES-cold.md), so it wants threads; 4 filled at 4.6 GB/s, 16 at 10.1
    num_thread: int = field(default_factory=lambda: min(16, usable_cpus()))
    chunk_size: int = 32 << 20
    # how a fill reads the store: past the page cache (O_DIRECT) or not, and in reads of this size
    # within each chunk (0: one read per chunk). Defaults are the shape measured best so far
    # (bench/NOTES-cold.md run 5); a peer's O_DIRECT 16 x 512 KiB is next to measure.
    fill_direct: bool = False
    fill_read_size: int = 0
    # a GPU-first copy of files the page cache lacks reads them O_DIRECT in 512 KiB reads (fastsafetensors'
    # shape), where the host has the cores for it: on the 16-core H200 host it read 1.15x the buffered ring
    # (cold pairs 0.75x fastsafetensors against 0.66x buffered, NOTES-cold run 22); on a 2-core VM 0.87x
    # (each stager's hash and copy leave no read in flight, where readahead keeps a buffered one busy)
    copy_direct: bool = field(default_factory=lambda: usable_cpus() >= COPY_DIRECT_CPUS)
    # those O_DIRECT reads each copy thread keeps in flight: 4 read 1.05x and 1.06x depth 1 on the H200
    # (bench/NOTES-cold.md runs 26, 27: faster in 5 of their 6 reps)
    copy_read_depth: int = 4
    copy_read_overlap: int = 0  # bytes each of them asks past its 512 KiB step (NOTES-cold.md run 27)
    mem_pool_size: int = 0  # 0: half of the machine's memory
    disk_size: int = 0  # 0: no bound
    registration_required: bool = False
    log_level: str = "info"
    metrics_port: int = 0
    allow_uids: str = ""  # comma-separated uids besides the owner allowed on the socket
    group: str = ""  # group given access to socket, segments and mount
    gpu_warmup: bool = True  # start the GPU copy engines (and pin fills) at start, not at the first load
    prefault: bool = True  # fault in hugetlb blanks at start for the fills (sidecar/prefault.py says why)
    origin: str = ""  # s3://bucket/prefix the sidecar pulls missing models from ("": none)
    origin_endpoint: str = ""  # the origin's S3 endpoint ("": the AWS SDK's, e.g. $AWS_ENDPOINT_URL)
    origin_kernels: bool = True  # push the store's kernel caches to the origin, pull those for this node's GPUs

    def __post_init__(self) -> None:
        self.storage_path = self.storage_path or str(_default_storage())
        self.socket = self.socket or str(_default_runtime_dir() / "sllmfs.sock")


_SIZES = {"chunk_size", "fill_read_size", "mem_pool_size", "disk_size", "copy_read_overlap"}


def config_file() -> Path:
    return Path(os.environ.get("SLLMFS_CONFIG", "/etc/sllmfs/config.toml"))


def load_settings(**flags: Any) -> Settings:
    """Merge flags (None = not given) over environment, config file and defaults."""
    merged: dict[str, Any] = {}
    path = config_file()
    if path.is_file():
        try:
            merged.update(tomllib.loads(path.read_text()))
        except (tomllib.TOMLDecodeError, OSError) as e:
            raise BadInput(f"config file {path} is not valid TOML ({e}); fix it or unset SLLMFS_CONFIG") from None
    known = {f.name: f for f in fields(Settings)}
    unknown = set(merged) - set(known)
    if unknown:
        raise BadInput(f"config file {path} has unknown setting {sorted(unknown)[0]!r}")
    for name in known:
        env = os.environ.get("SLLMFS_" + name.upper())
        if env is not None:
            merged[name] = env
    merged.update({k: v for k, v in flags.items() if v is not None})
    out: dict[str, Any] = {}
    for name, value in merged.items():
        kind = known[name].type
        if name in _SIZES:
            out[name] = parse_size(value, f"--{name.replace('_', '-')}")
        elif kind == "int":
            try:
                out[name] = int(value)
            except (TypeError, ValueError):
                raise BadInput(f"--{name.replace('_', '-')} {value!r} is not a whole number") from None
        elif kind == "bool":
            out[name] = value if isinstance(value, bool) else parse_flag(str(value))
        else:
            out[name] = str(value)
    return Settings(**out)


def parse_flag(text: str) -> bool:
    """The one reading of an on/off setting: 1, true, yes, on (any case) are on, anything else off."""
    return text.lower() in ("1", "true", "yes", "on")


# Per-process settings: read where they apply (a client, a loader), not by the daemon's Settings,
# but all through these accessors so each is parsed one way.


def env_str(name: str, default: str = "") -> str:
    """``$name`` as given, or ``default`` when unset."""
    return os.environ.get(name, default)


def env_flag(name: str, default: bool = False) -> bool:
    """``$name`` as an on/off setting (:func:`parse_flag`), or ``default`` when unset or empty."""
    raw = os.environ.get(name, "")
    return parse_flag(raw) if raw else default


def env_seconds(name: str, default: float) -> float:
    """``$name`` as a number of seconds above 0, or ``default`` when unset or empty."""
    raw = os.environ.get(name, "")
    try:
        seconds = float(raw) if raw else default
    except ValueError:
        seconds = 0.0
    if not seconds > 0:  # NaN too
        raise BadInput(f"{name}={raw!r} is not a number of seconds above 0")
    return seconds


def hint_flags(**given: Any) -> str:
    """Flags to append to a command we suggest, so it acts on the same store or sidecar when pasted:
    each given setting (``storage_path=...``, ``socket=...``) that differs from the built-in default."""
    defaults = Settings()
    out = ""
    for name, value in given.items():
        if value is not None and str(value) != str(getattr(defaults, name)):
            out += f" --{name.replace('_', '-')} {shlex.quote(str(value))}"
    return out
