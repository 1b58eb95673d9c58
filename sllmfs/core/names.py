"""Model names and variant keys, and how they map to store paths.

A model name is kept as the user gave it (``org/name``); on disk it becomes one
directory component by percent-encoding the ``/``, so no name can reach outside
the store and ``org/name`` never collides with a model called ``org``.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

from sllmfs.core.errors import BadInput

_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_VARIANT = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,127}$")
MAX_COMPONENTS = 4


def check_model_name(name: str) -> str:
    """Return ``name`` if it is a safe model name, else raise BadInput."""
    parts = name.split("/")
    if not name or name.startswith("/") or len(parts) > MAX_COMPONENTS:
        raise BadInput(
            f"bad model name {name!r}: use 'name' or 'org/name' "
            f"(at most {MAX_COMPONENTS} parts, no leading '/')"
        )
    for part in parts:
        if part in (".", "..") or not _COMPONENT.match(part):
            raise BadInput(
                f"bad model name {name!r}: part {part!r} must start with a letter or digit "
                "and hold only letters, digits and . _ + - (no '..')"
            )
    if len(quote(name, safe="")) > MAX_DIRNAME:
        raise BadInput(f"model name {name[:40]!r}... is too long: at most {MAX_DIRNAME} bytes once its '/' "
                       "are encoded; use a shorter name")
    return name


def check_variant(key: str) -> str:
    if not _VARIANT.match(key) or ".." in key:
        raise BadInput(f"bad variant key {key!r}: lowercase letters, digits and . _ + - only")
    return key


def model_dirname(name: str) -> str:
    """The single directory component that stores model ``name``."""
    return quote(check_model_name(name), safe="")


MAX_DIRNAME = 255  # one path component on Linux file systems


def model_name_from_dirname(dirname: str) -> str:
    return unquote(dirname)


HF_VARIANT = "hf"  # the checkpoint as saved: any framework reads it at any TP size
ADAPTER_PREFIX = "lora."


def adapter_variant(adapter_name: str) -> str:
    """LoRA adapters live beside their base model as variants ``lora.<name>``."""
    return check_variant(ADAPTER_PREFIX + adapter_name.lower())
