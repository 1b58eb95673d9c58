"""Shared fixtures: tiny real checkpoints built offline once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_dir(models_dir: Path) -> Path:
    from sllmfs.ops.demo import build_model

    return build_model(models_dir / "llama", "llama")


@pytest.fixture(scope="session")
def qwen_tied_dir(models_dir: Path) -> Path:
    from sllmfs.ops.demo import build_model

    return build_model(models_dir / "qwen-tied", "qwen2", tied=True)


@pytest.fixture(scope="session")
def sharded_dir(models_dir: Path) -> Path:
    from sllmfs.ops.demo import build_model

    return build_model(models_dir / "sharded", "llama", shard_size="100KB")


@pytest.fixture(scope="session")
def bin_dir(models_dir: Path) -> Path:
    from sllmfs.ops.demo import build_model

    return build_model(models_dir / "bin", "qwen2", tied=True, safe=False)


@pytest.fixture(scope="session")
def lora_dir(models_dir: Path, llama_dir: Path) -> Path:
    pytest.importorskip("peft")
    from sllmfs.ops.demo import build_lora

    return build_lora(llama_dir, models_dir / "lora")


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"
