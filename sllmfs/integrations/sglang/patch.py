"""Apply, check or revert patches/sglang-<release>-sllm.patch on an installed SGLang.

One patch per supported release (sllmfs.integrations.sglang.compat), picked by the release
installed where the patch goes (its dist-info, else ``sglang/_version.py``). The patch is a
plain unified diff relative to site-packages. We apply it ourselves (exact context, any line
offset, no fuzz) so no ``patch`` binary is needed, and every file is replaced atomically: a
half-patched SGLang is impossible. The plugin makes ``--load-format sllm`` work without any
of this.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sllmfs.core.errors import BadInput, NotFound
from sllmfs.integrations.sglang import compat

PATCHES = Path(__file__).resolve().parents[3] / "patches"  # sllmfs/integrations/sglang/ -> checkout
APPLIED, NOT_APPLIED, CONFLICT = "applied", "not applied", "conflict"
_HUNK = re.compile(r"^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@")


@dataclass
class Hunk:
    old_start: int
    old: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)


@dataclass
class FilePatch:
    path: str  # relative to site-packages
    hunks: list[Hunk] = field(default_factory=list)


def patch_name(version: str) -> str:
    return f"sglang-{version}-sllm.patch"


def shipped() -> list[str]:
    """The releases a patch is shipped for, oldest first."""
    found = [p.name.removeprefix("sglang-").removesuffix("-sllm.patch") for p in PATCHES.glob("sglang-*-sllm.patch")]
    return sorted(found, key=lambda v: compat.release(v) or (0, 0, 0))


def patch_file(version: str | None) -> Path:
    """The shipped patch for SGLang ``version`` (patches/ in a source checkout)."""
    if version is None:
        raise NotFound("cannot tell which SGLang release is installed there (no sglang dist-info or "
                       "sglang/_version.py); pass the site-packages that holds SGLang")
    here = PATCHES / patch_name(version)
    if here.is_file():
        return here
    if not PATCHES.is_dir():
        raise NotFound("the SGLang patches are not shipped with this sllmfs install; use a source checkout "
                       "(patches/) or rely on the plugin, which needs no patch")
    raise NotFound(f"no patch for SGLang {version} (patches exist for {', '.join(shipped()) or 'none'}); "
                   "the sllmfs plugin makes --load-format sllm work without a patch")


def parse(text: str) -> list[FilePatch]:
    files: list[FilePatch] = []
    hunk: Hunk | None = None
    for line in text.splitlines():
        if line.startswith("--- "):
            hunk = None
        elif line.startswith("+++ "):
            path = line[4:].split("\t")[0].strip()
            path = path[2:] if path.startswith("b/") else path
            if path.startswith("/") or ".." in Path(path).parts:
                raise BadInput(f"patch names an unsafe path {path!r}")
            files.append(FilePatch(path))
        elif (m := _HUNK.match(line)) and files:
            hunk = Hunk(int(m.group(1)))
            files[-1].hunks.append(hunk)
        elif hunk is not None and line[:1] in (" ", "-", "+", ""):
            body = line[1:]
            if line[:1] in (" ", ""):
                hunk.old.append(body)
                hunk.new.append(body)
            elif line[:1] == "-":
                hunk.old.append(body)
            else:
                hunk.new.append(body)
    if not files:
        raise BadInput("the SGLang patch is empty or not a unified diff")
    return files


def _find(lines: list[str], block: list[str], near: int) -> int | None:
    """Start index of ``block`` in ``lines``, nearest to line ``near`` (1-based); None if absent."""
    hits = [i for i in range(len(lines) - len(block) + 1) if lines[i : i + len(block)] == block]
    return min(hits, key=lambda i: abs(i - (near - 1))) if hits else None


def _file_state(lines: list[str], fp: FilePatch) -> str:
    states = set()
    for h in fp.hunks:
        if _find(lines, h.new, h.old_start) is not None:
            states.add(APPLIED)
        elif _find(lines, h.old, h.old_start) is not None:
            states.add(NOT_APPLIED)
        else:
            states.add(CONFLICT)
    return states.pop() if len(states) == 1 else CONFLICT


def _rewrite(lines: list[str], fp: FilePatch, reverse: bool) -> list[str]:
    out = list(lines)
    for h in sorted(fp.hunks, key=lambda h: h.old_start, reverse=True):
        old, new = (h.new, h.old) if reverse else (h.old, h.new)
        i = _find(out, old, h.old_start)
        if i is None:
            raise BadInput(f"{fp.path}: the patch does not fit this file")
        out[i : i + len(old)] = new
    return out


def site_packages() -> Path:
    spec = importlib.util.find_spec("sglang")  # finds the package without importing it
    if spec is None or not spec.origin:
        raise NotFound("SGLang is not installed in this Python; "
                       f"`pip install 'sglang>={compat.OLDEST},<={compat.NEWEST}'` first")
    return Path(spec.origin).parent.parent


def installed_version(root: Path) -> str | None:
    """The SGLang release under ``root``: its dist-info, else the package's version file (a copied package)."""
    for dist in importlib.metadata.distributions(path=[str(root)]):
        if (dist.metadata["Name"] or "").lower() == "sglang":
            return dist.version
    for name in ("_version.py", "version.py"):  # setuptools-scm writes the first; the second imports it
        try:
            text = (root / "sglang" / name).read_text()
        except OSError:
            continue
        m = re.search(r"""^__version__\s*=\s*(?:version\s*=\s*)?["']([^"']+)["']""", text, re.M)
        if m:
            return m[1]
    return None


@dataclass
class Report:
    root: Path
    version: str | None
    files: dict[str, str]  # path -> applied / not applied / conflict

    @property
    def state(self) -> str:
        states = set(self.files.values())
        return states.pop() if len(states) == 1 else CONFLICT


def _read(root: Path, fp: FilePatch, version: str | None) -> list[str]:
    try:
        return (root / fp.path).read_text().split("\n")
    except FileNotFoundError:
        raise NotFound(f"{root / fp.path} is missing: is SGLang {version or ''} installed there?") from None


def check(root: Path | None = None, patch: Path | None = None) -> Report:
    root = root or site_packages()
    version = installed_version(root)
    fps = parse((patch or patch_file(version)).read_text())
    return Report(root, version, {fp.path: _file_state(_read(root, fp, version), fp) for fp in fps})


def apply(root: Path | None = None, patch: Path | None = None, *, reverse: bool = False) -> Report:
    """Apply (or revert) the patch; already-done files are left alone. Returns the final check."""
    root = root or site_packages()
    patch = patch or patch_file(installed_version(root))
    report = check(root, patch)
    meant_for = patch.name.removeprefix("sglang-").removesuffix("-sllm.patch")
    if report.version is not None and report.version != meant_for:
        raise BadInput(f"installed SGLang is {report.version}, {patch.name} is for {meant_for}; "
                       f"use {patch_name(report.version)} or the sllmfs plugin, which needs no patch")
    bad = [p for p, s in report.files.items() if s == CONFLICT]
    if bad:
        raise BadInput(f"{root / bad[0]} does not match the patch (edited, or another SGLang build); "
                       f"reinstall SGLang {report.version} or use the plugin without the patch")
    todo = NOT_APPLIED if not reverse else APPLIED
    for fp in parse(patch.read_text()):
        if report.files[fp.path] != todo:
            continue
        target = root / fp.path
        new = "\n".join(_rewrite(_read(root, fp, report.version), fp, reverse))
        tmp = target.with_name(f".{target.name}.sllmfs-tmp")
        tmp.write_text(new)
        os.chmod(tmp, target.stat().st_mode & 0o7777)
        os.replace(tmp, target)  # atomic per file; stale .pyc is rebuilt (source mtime changed)
    return check(root, patch)
