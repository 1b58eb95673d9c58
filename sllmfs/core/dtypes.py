"""Every dtype the store knows: safetensors code, torch name, item size.

The store keeps safetensors' dtype codes so synthesized files need no mapping.
Codes torch has but safetensors lacks get names in the same style. torch is
optional here: the core (save from safetensors, sidecar, FUSE) runs without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sllmfs.core.errors import BadInput


@dataclass(frozen=True)
class DType:
    code: str  # safetensors-style code, stored in manifests
    torch_name: str  # attribute of the torch module
    itemsize: int  # bytes per element (packed sub-byte kinds count the pack)
    numpy: str  # numpy dtype holding the same bits (raw unsigned ints where numpy lacks it)


_TABLE = [
    DType("BOOL", "bool", 1, "bool"),
    DType("U8", "uint8", 1, "uint8"),
    DType("I8", "int8", 1, "int8"),
    DType("U16", "uint16", 2, "uint16"),
    DType("I16", "int16", 2, "int16"),
    DType("U32", "uint32", 4, "uint32"),
    DType("I32", "int32", 4, "int32"),
    DType("U64", "uint64", 8, "uint64"),
    DType("I64", "int64", 8, "int64"),
    DType("F16", "float16", 2, "float16"),
    DType("BF16", "bfloat16", 2, "uint16"),
    DType("F32", "float32", 4, "float32"),
    DType("F64", "float64", 8, "float64"),
    DType("C64", "complex64", 8, "complex64"),
    DType("C128", "complex128", 16, "complex128"),
    DType("F8_E4M3", "float8_e4m3fn", 1, "uint8"),
    DType("F8_E4M3FNUZ", "float8_e4m3fnuz", 1, "uint8"),
    DType("F8_E5M2", "float8_e5m2", 1, "uint8"),
    DType("F8_E5M2FNUZ", "float8_e5m2fnuz", 1, "uint8"),
    DType("F8_E8M0", "float8_e8m0fnu", 1, "uint8"),
    DType("F4_X2", "float4_e2m1fn_x2", 1, "uint8"),
]

BY_CODE: dict[str, DType] = {d.code: d for d in _TABLE}
BY_TORCH_NAME: dict[str, DType] = {d.torch_name: d for d in _TABLE}
# safetensors writes the E4M3 "fn" kind as plain F8_E4M3; older writers used these aliases.
_ALIASES = {"F8_E4M3FN": "F8_E4M3", "F8_E8M0FNU": "F8_E8M0"}


def by_code(code: str, where: str = "") -> DType:
    code = _ALIASES.get(code, code)
    try:
        return BY_CODE[code]
    except KeyError:
        raise BadInput(
            f"unknown dtype {code!r}{' in ' + where if where else ''}: "
            f"sllmfs knows {', '.join(sorted(BY_CODE))}"
        ) from None


def from_torch(dtype: Any) -> DType:
    name = str(dtype).removeprefix("torch.")
    try:
        return BY_TORCH_NAME[name]
    except KeyError:
        raise BadInput(f"unsupported torch dtype {name}") from None


def to_torch(d: DType) -> Any:
    import torch

    return getattr(torch, d.torch_name)


def nbytes(d: DType, shape: list[int]) -> int:
    n = d.itemsize
    for s in shape:
        n *= s
    return n
