"""Write patches/sglang-<version>-sllm.patch from an unpacked SGLang wheel (or site-packages).

    python patches/make_sglang_patch.py <dir holding sglang/> <version>

The patch makes ``sllm`` a built-in load format: a ``LoadFormat.SLLM`` member, a
``--load-format`` choice and a ``get_model_loader`` branch. The three edits are anchored on
lines every release 0.5.17–0.5.23 has; a release where an anchor is missing or repeated
stops here with the file's name, to be patched by hand. ``sllmfs patch-sglang`` picks the
patch for the installed release.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

LOAD_CONFIG = "sglang/srt/configs/load_config.py"
CHOICES = ("sglang/srt/arg_groups/choices.py", "sglang/srt/server_args.py")  # 0.5.20+, before
LOADER = "sglang/srt/model_loader/loader.py"


def insert_after(lines: list[str], anchor: str, new: list[str], path: str) -> list[str]:
    hits = [i for i, line in enumerate(lines) if line == anchor]
    if len(hits) != 1:
        sys.exit(f"{path}: {len(hits)} lines read {anchor.strip()!r}, expected one; patch this release by hand")
    return lines[: hits[0] + 1] + new + lines[hits[0] + 1 :]


def edits(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    out = {}
    text = (root / LOAD_CONFIG).read_text().splitlines(keepends=True)
    out[LOAD_CONFIG] = (text, insert_after(text, '    IPC_CACHE = "ipc_cache"\n',
                                           ['    SLLM = "sllm"  # sllmfs sidecar (pip install sllmfs)\n'], LOAD_CONFIG))
    choices = next(c for c in CHOICES if (root / c).is_file() and '    "runai_streamer",\n' in (root / c).read_text())
    text = (root / choices).read_text().splitlines(keepends=True)
    out[choices] = (text, insert_after(text, '    "runai_streamer",\n', ['    "sllm",\n'], choices))
    text = (root / LOADER).read_text().splitlines(keepends=True)
    branch = ["\n", "    if load_config.load_format == LoadFormat.SLLM:\n",
              "        from sllmfs.integrations.sglang.loader import SllmModelLoader\n", "\n",
              "        return SllmModelLoader(load_config)\n"]
    out[LOADER] = (text, insert_after(text, "        return DummyModelLoader(load_config)\n", branch, LOADER))
    return out


def main(root: Path, version: str) -> None:
    diff: list[str] = []
    for path, (old, new) in edits(root).items():
        diff += difflib.unified_diff(old, new, f"a/{path}", f"b/{path}", n=3)
    target = Path(__file__).resolve().parent / f"sglang-{version}-sllm.patch"
    target.write_text("".join(line.replace("\t", "") for line in diff))  # no dates after the names
    print(target)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
