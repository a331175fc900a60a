"""Preloading, explicit load and unload, and dtypes of the serving engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters_app.serving.adapters import ADAPTER_WEIGHTS_NAME, file_sha256
from adapters_app.serving.base import BaseModel, BaseModelError, load_base_model, resolve_dtype
from adapters_app.serving.engine import Engine, GenerationRequest, PreloadItem
from tests.unit.test_serving_adapters import save_lora_adapter


@pytest.fixture(scope="module")
def tiny_base(tiny_base_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_base_dir))


@pytest.fixture(scope="module")
def adapter_dirs(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("preload_adapters")
    return [
        save_lora_adapter(tiny_base_dir, root / f"adapter-{seed}", rank=2, target_modules=["c_attn"], seed=seed)
        for seed in (61, 62, 63)
    ]


def test_preload_stops_at_capacity(tiny_base: BaseModel, adapter_dirs: list[Path]) -> None:
    engine = Engine(tiny_base, cache_max_adapters=2)
    items = [PreloadItem(key=f"v{index}", path=folder) for index, folder in enumerate(adapter_dirs)]
    try:
        report = engine.preload(items)

        assert report.loaded == ("v0", "v1")
        assert report.skipped == ("v2",)
        assert report.failed == {}
        assert engine.cache.keys() == ["v0", "v1"]
        assert engine.cache.stats().evictions == 0
    finally:
        engine.close()


def test_preload_pinned_first(tiny_base: BaseModel, adapter_dirs: list[Path]) -> None:
    engine = Engine(tiny_base, cache_max_adapters=1)
    items = [
        PreloadItem(key="plain", path=adapter_dirs[0]),
        PreloadItem(key="pinned", path=adapter_dirs[1], pinned=True),
    ]
    try:
        report = engine.preload(items)

        assert report.loaded == ("pinned",)
        assert report.skipped == ("plain",)
        assert engine.cache.stats().pinned == 1
    finally:
        engine.close()


def test_preload_reports_bad_adapter(tiny_base: BaseModel, adapter_dirs: list[Path]) -> None:
    engine = Engine(tiny_base)
    items = [
        PreloadItem(key="wrong-hash", path=adapter_dirs[0], sha256="0" * 64),
        PreloadItem(key="good", path=adapter_dirs[1], sha256=file_sha256(adapter_dirs[1] / ADAPTER_WEIGHTS_NAME)),
    ]
    try:
        report = engine.preload(items)

        assert report.loaded == ("good",)
        assert "sha256" in report.failed["wrong-hash"]
        assert "wrong-hash" not in engine.cache
    finally:
        engine.close()


def test_explicit_load_and_unload(tiny_base: BaseModel, adapter_dirs: list[Path]) -> None:
    engine = Engine(tiny_base)
    try:
        adapter, first_hit = engine.load("v1", adapter_dirs[0], pin=True)
        _again, second_hit = engine.load("v1", adapter_dirs[0])

        assert not first_hit
        assert second_hit
        assert adapter.key == "v1"
        assert engine.cache.stats().pinned == 1
        assert engine.unload("v1")
        assert not engine.unload("v1")
        assert engine.cache.stats().pinned == 0
        request = GenerationRequest(prompt="Hi", adapter_key="v1")
        with pytest.raises(ValueError, match="not loaded and the request has no adapter_path"):
            engine.generate_one(request)
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("name", "device", "expected"),
    [
        ("auto", "cpu", torch.float32),
        ("auto", "cuda", torch.float16),
        ("bfloat16", "cpu", torch.bfloat16),
        ("float16", "cuda:0", torch.float16),
    ],
)
def test_resolve_dtype(name: str, device: str, expected: torch.dtype) -> None:
    assert resolve_dtype(name, device) == expected


@pytest.mark.parametrize(("name", "message"), [("float16", "needs a CUDA device"), ("int8", "is invalid")])
def test_resolve_dtype_rejects(name: str, message: str) -> None:
    with pytest.raises(BaseModelError, match=message):
        resolve_dtype(name, "cpu")


def test_bfloat16_base_casts_adapters(tiny_base_dir: Path, adapter_dirs: list[Path]) -> None:
    base = load_base_model(str(tiny_base_dir), dtype=torch.bfloat16)
    engine = Engine(base)
    try:
        adapter, _hit = engine.load("bf16", adapter_dirs[0])
        result = engine.generate_one(GenerationRequest(prompt="Hi", adapter_key="bf16", max_new_tokens=3))

        assert all(weights.a_t.dtype == torch.bfloat16 for weights in adapter.modules.values())
        assert result.completion_tokens == 3
    finally:
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float16_matches_cpu_greedy(tiny_base_dir: Path, tiny_base: BaseModel, adapter_dirs: list[Path]) -> None:
    # NOTE: written for CUDA but never run here (no GPU); float16 may flip a near-tie token.
    cuda_base = load_base_model(str(tiny_base_dir), device="cuda", dtype=torch.float16)
    cuda_engine = Engine(cuda_base)
    cpu_engine = Engine(tiny_base)
    request = GenerationRequest(prompt="Hi", adapter_key="gpu", adapter_path=adapter_dirs[0], max_new_tokens=4)
    try:
        assert cuda_engine.generate_one(request).completion_tokens == 4
        assert cpu_engine.generate_one(request).completion_tokens == 4
    finally:
        cuda_engine.close()
        cpu_engine.close()
