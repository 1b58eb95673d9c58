"""Sidecar commands: start, status, pin, unpin, evict, register, load."""

from __future__ import annotations

import json
from typing import Optional

import typer

from sllmfs.cli import app
from sllmfs.cli.progress import byte_bar, human, out
from sllmfs.client import client as sidecar_client
from sllmfs.core.config import Settings, load_settings
from sllmfs.core.errors import BadInput
from sllmfs.core.names import HF_VARIANT

SocketOpt = typer.Option(None, "--socket", help="Sidecar socket (default: $SLLMFS_SOCKET or config).")
VariantOpt = typer.Option(HF_VARIANT, "--variant", help="Variant key (hf, or a framework variant).")


_D = Settings()  # the built-in defaults, shown in `start --help`


def _default(value: object) -> str:
    return f" (default: {value})"  # not [..]: rich would take it for markup


@app.command(help="Run the sidecar in the foreground: store, memory tier, socket and FUSE mount. "
             "Each flag falls back to $SLLMFS_<FLAG>, then the TOML file $SLLMFS_CONFIG "
             "(default /etc/sllmfs/config.toml), then the default shown; see docs/protocol.md.")
def start(
    storage_path: Optional[str] = typer.Option(None, "--storage-path", help="Store directory."
                                               + _default(_D.storage_path)),
    socket: Optional[str] = typer.Option(None, "--socket", help="Unix socket to serve." + _default(_D.socket)),
    mount: Optional[str] = typer.Option(None, "--mount", help="Mount the read-only FUSE view here."
                                        + _default("no mount")),
    num_thread: Optional[int] = typer.Option(None, "--num-thread", help="Parallel reads per fill."
                                             + _default("the CPU count, at most 16")),
    chunk_size: Optional[str] = typer.Option(None, "--chunk-size", help="Fill read size, e.g. 32MiB (4 MiB units)."
                                             + _default("32MiB")),
    fill_direct: Optional[bool] = typer.Option(
        None, "--fill-direct/--no-fill-direct", help="Fills read the store past the page cache (O_DIRECT)."
        + _default("--no-fill-direct")),
    copy_direct: Optional[bool] = typer.Option(
        None, "--copy-direct/--no-copy-direct", help="GPU-first copies of files the page cache lacks read them "
        "past it (O_DIRECT, 512 KiB reads)." + _default("on with 8 or more CPUs")),
    copy_read_depth: Optional[int] = typer.Option(
        None, "--copy-read-depth", help="O_DIRECT reads each copy thread keeps in flight (1-64)." + _default(4)),
    copy_read_overlap: Optional[str] = typer.Option(
        None, "--copy-read-overlap", help="Bytes each of those reads asks past its 512 KiB step, e.g. 4KiB "
        "(4 KiB units, at most 1MiB)." + _default(0)),
    fill_read_size: Optional[str] = typer.Option(None, "--fill-read-size", help="Each fill read, e.g. 512KiB "
                                                 "(4 KiB units; 0: one read per --chunk-size)." + _default("0")),
    mem_pool_size: Optional[str] = typer.Option(None, "--mem-pool-size", help="Memory tier budget, e.g. 64GB."
                                                + _default("half of the machine's memory")),
    disk_size: Optional[str] = typer.Option(None, "--disk-size", help="Store budget, e.g. 1TB (0: unbounded)."
                                            + _default("0")),
    registration_required: Optional[bool] = typer.Option(
        None, "--registration-required/--no-registration-required", help="Serve only registered models."
        + _default("--no-registration-required")),
    log_level: Optional[str] = typer.Option(None, "--log-level", help="debug | info | warning | error"
                                            + _default(_D.log_level)),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", help="Serve Prometheus metrics on "
                                               "127.0.0.1:PORT (0: off)." + _default(0)),
    gpu_warmup: Optional[bool] = typer.Option(
        None, "--gpu-warmup/--no-gpu-warmup", help="Start GPU copy engines at start or at the first load."
        + _default("--gpu-warmup")),
    prefault: Optional[bool] = typer.Option(
        None, "--prefault/--no-prefault", help="Fault in the free hugetlb pages as blank segments (up to "
        "--mem-pool-size), at start and again after evictions, pinned for GPU copies on a GPU node: fills then "
        "write into memory already faulted in and pinned." + _default("--prefault")),
    origin: Optional[str] = typer.Option(None, "--origin", help="Pull models missing from the store from this "
                                         "S3 origin, s3://bucket/prefix." + _default("none")),
    origin_endpoint: Optional[str] = typer.Option(None, "--origin-endpoint", help="The origin's S3 endpoint URL."
                                                  + _default("the AWS SDK's: $AWS_ENDPOINT_URL, profile")),
    origin_kernels: Optional[bool] = typer.Option(
        None, "--origin-kernels/--no-origin-kernels", help="With --origin: push the store's kernel caches there "
        "and pull the ones made for this node's GPUs (a new node starts with the fleet's compiled kernels)."
        + _default("--origin-kernels")),
    host: Optional[str] = typer.Option(None, "--host", hidden=True, help="sllm-store's gRPC host: refused."),
    port: Optional[int] = typer.Option(None, "--port", hidden=True, help="sllm-store's gRPC port: refused."),
) -> None:
    from sllmfs.sidecar.daemon import run

    if host is not None or port is not None:
        raise BadInput("--host/--port were sllm-store's gRPC address; sllmfs serves a Unix socket: use "
                       "--socket PATH (and --metrics-port PORT for Prometheus)")
    settings = load_settings(storage_path=storage_path, socket=socket, mount=mount, num_thread=num_thread,
                             chunk_size=chunk_size, fill_direct=fill_direct, fill_read_size=fill_read_size,
                             copy_direct=copy_direct, copy_read_depth=copy_read_depth,
                             copy_read_overlap=copy_read_overlap,
                             mem_pool_size=mem_pool_size, disk_size=disk_size,
                             registration_required=registration_required, log_level=log_level,
                             metrics_port=metrics_port, gpu_warmup=gpu_warmup, prefault=prefault, origin=origin,
                             origin_endpoint=origin_endpoint, origin_kernels=origin_kernels)
    if settings.num_thread < 1:
        raise BadInput(f"--num-thread {settings.num_thread} must be at least 1")
    _check_copy_reads(settings.copy_read_depth, settings.copy_read_overlap)
    if settings.fill_read_size % 4096:
        raise BadInput(f"--fill-read-size {settings.fill_read_size} must be a multiple of 4 KiB (O_DIRECT's unit)")
    if settings.origin:  # a bad URL is refused here, not at the first miss
        from sllmfs.origin.url import parse

        parse(settings.origin, settings.origin_endpoint)
    run(settings)


def _check_copy_reads(depth: int, overlap: int) -> None:
    """One line at start for a read shape the copy engine would refuse later (it is built lazily)."""
    try:
        from sllmfs.engine.native import READ_ALIGN, READ_DEPTH_MAX, READ_OVERLAP_MAX
    except ImportError:  # no native engine in this build: no GPU copies, nothing to check these against
        return

    if not 1 <= depth <= READ_DEPTH_MAX:
        raise BadInput(f"--copy-read-depth {depth} must be 1-{READ_DEPTH_MAX}")
    if overlap % READ_ALIGN or overlap > READ_OVERLAP_MAX:
        raise BadInput(f"--copy-read-overlap {overlap} must be a multiple of {READ_ALIGN >> 10} KiB, "
                       f"at most {READ_OVERLAP_MAX >> 20} MiB")


@app.command(help="Show tiers, models, leases and hit rates.")
def status(socket: Optional[str] = SocketOpt,
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    with sidecar_client.connect(socket) as c:
        st = c.status()
    if as_json:
        print(json.dumps(st, indent=1))
        return
    mem, disk, n = st["memory"], st["disk"], st["counters"]
    copies = mem.get("mount_copies", 0)  # a sidecar from before this field: none counted
    blanks = mem.get("blanks", 0)
    out.print(f"memory tier: {human(mem['used'])} of {human(mem['budget'])}"
              + (f" ({human(copies)} in the mount's passthrough copies)" if copies else "")
              + (f", {human(blanks)} faulted in for the next fills" if blanks else ""))
    out.print(f"disk tier:   {human(disk['used'])} of {human(disk['budget']) if disk['budget'] else 'unbounded'}")
    kc = st.get("kernel_caches") or {"entries": 0, "bytes": 0}
    out.print(f"kernel caches: {kc['entries']} ({human(kc['bytes'])}; `sllmfs kernels ls`)")
    out.print(f"hits {n['hits']}  misses {n['misses']}  filled {human(n['bytes_filled'])}  "
                  f"evictions {n['evictions']}  leases {len(st['leases'])}")
    from rich.table import Table

    # "on disk": whether the disk budget may evict it (it can be saved again) or it is the only copy
    table = Table("model", "tier", "variant", "state", "memory", "leases", "pinned", "on disk")
    for m in st["models"]:
        disk = ("origin copy (evictable)" if m.get("origin_copy") else "cache (evictable)" if m.get("disk_evictable")
                else "only copy (kept)")
        if not m["variants"]:
            table.add_row(m["name"], "disk", "", "", "", "", "", disk)
        for v in m["variants"]:
            table.add_row(m["name"], "memory", v["variant"], v["state"], human(v["bytes"]), str(v["leases"]),
                          "yes" if v["pinned"] else "", disk)
    out.print(table)


ModelOpt = typer.Option(..., "--model", help="Model name as stored (see `sllmfs ls`).")


@app.command(help="Keep a model in memory (fills it if needed): never evicted.")
def pin(model: str = ModelOpt, variant: str = VariantOpt,
        socket: Optional[str] = SocketOpt) -> None:
    with sidecar_client.connect(socket) as c:
        state = c.pin(model, variant)
    out.print(f"pinned {model} [{variant}] ({state})")


@app.command(help="Let a pinned model be evicted again.")
def unpin(model: str = ModelOpt, variant: str = VariantOpt,
          socket: Optional[str] = SocketOpt) -> None:
    with sidecar_client.connect(socket) as c:
        was = c.unpin(model, variant)
    out.print(f"unpinned {model} [{variant}]" if was else f"{model} [{variant}] was not pinned")


@app.command(help="Drop a model from the memory tier (it stays in the store).")
def evict(model: str = ModelOpt,
          variant: Optional[str] = typer.Option(None, "--variant", help="Only this variant (default: all)."),
          socket: Optional[str] = SocketOpt) -> None:
    with sidecar_client.connect(socket) as c:
        gone = c.evict(model, variant)
    out.print(f"evicted {model} [{', '.join(gone)}]" if gone else f"{model} was not in memory")


@app.command(help="Allow a model on a sidecar started with --registration-required.")
def register(model: str = ModelOpt, socket: Optional[str] = SocketOpt) -> None:
    with sidecar_client.connect(socket) as c:
        c.register(model)
    out.print(f"registered {model}")


@app.command(help="Load a model through the sidecar (--warm: prefetch it into the memory tier).")
def load(
    model: str = ModelOpt,
    variant: str = VariantOpt,
    warm: bool = typer.Option(False, "--warm", help="Prefetch into host memory and return."),
    backend: Optional[str] = typer.Option(None, "--backend", help="transformers: load, time, generate."),
    adapter_name: Optional[str] = typer.Option(None, "--adapter-name", help="Also load this LoRA adapter."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Cast on load, e.g. float16."),
    device: str = typer.Option("cuda", "--device", help="cuda, cuda:N or cpu (the host target)."),
    storage_path: Optional[str] = typer.Option(None, "--storage-path", help="Unused by loads; accepted "
                                               "for sllm-store compatibility."),
    tensor_parallel_size: Optional[int] = typer.Option(None, "--tensor-parallel-size", hidden=True,
                                                       help="sllm-store's per-rank load: refused."),
    socket: Optional[str] = SocketOpt,
) -> None:
    if tensor_parallel_size is not None:
        raise BadInput("`sllmfs load --tensor-parallel-size`: per-rank loads happen inside the serving engine; "
                       "start SGLang with --load-format sllm --tp N (each rank loads its own variant)")
    if warm:
        _warm(model, variant, socket)
        return
    if backend != "transformers":
        raise BadInput("`sllmfs load` needs --warm, or --backend transformers (SGLang loads with "
                       "--load-format sllm)")
    from sllmfs.cli.load_framework import load_transformers

    load_transformers(model, adapter=adapter_name, precision=precision, device=device, socket=socket)


def _warm(model: str, variant: str, socket: str | None) -> None:
    state = {"done": 0}
    with byte_bar(f"warm {model}", None) as advance:  # the sidecar tells the total with its first answer
        def progress(done: int, total: int) -> None:
            advance(done - state["done"], total or None)
            state["done"] = done

        total = sidecar_client.warm(model, variant, socket=socket, progress=progress)
    out.print(f"{model} [{variant}] is in memory: {human(total)}")
