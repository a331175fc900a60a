"""Reading PEFT LoRA folders into serving weights, and the adapter LRU cache."""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_app.serving.adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterCache,
    AdapterError,
    LoadedAdapter,
    file_sha256,
    read_adapter,
)
from adapters_app.serving.base import BaseModel, load_base_model

KEY_PREFIX = "base_model.model."


def save_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int,
    target_modules: Sequence[str],
    seed: int,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> Path:
    """Save a PEFT LoRA for the base at `base_dir` with random, non-zero A and B factors.

    PEFT starts B at zero, which would make every adapter a no-op, so both factors are
    overwritten from a seeded generator with values large enough to change greedy outputs.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(base_dir)
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha if lora_alpha is not None else 2 * rank,
        target_modules=list(target_modules),
        fan_in_fan_out=True,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
    )
    peft_model = get_peft_model(model, config)

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)

    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def tiny_base(tiny_base_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_base_dir))


@pytest.fixture(scope="module")
def adapter_dir(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "rank4"
    return save_lora_adapter(tiny_base_dir, out, rank=4, target_modules=["c_attn", "c_fc"], seed=1)


def copy_adapter(adapter_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(adapter_dir, target)
    return target


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / ADAPTER_CONFIG_NAME
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_weights(folder: Path, edit) -> None:
    path = folder / ADAPTER_WEIGHTS_NAME
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_read_adapter_returns_peft_weights(tiny_base: BaseModel, adapter_dir: Path) -> None:
    adapter = read_adapter(adapter_dir, tiny_base, key="v1")
    saved = load_file(str(adapter_dir / ADAPTER_WEIGHTS_NAME))

    expected_paths = {
        f"transformer.h.{layer}.{module}"
        for layer in (0, 1)
        for module in ("attn.c_attn", "mlp.c_fc")
    }
    assert set(adapter.modules) == expected_paths
    assert adapter.key == "v1"
    assert adapter.rank == 4
    assert adapter.alpha == 8
    assert adapter.target_modules == ("c_attn", "c_fc")
    assert adapter.sha256 == file_sha256(adapter_dir / ADAPTER_WEIGHTS_NAME)
    assert adapter.load_seconds > 0

    weights = adapter.modules["transformer.h.0.attn.c_attn"]
    assert weights.lora_a.shape == (4, 128)
    assert weights.lora_b.shape == (384, 4)
    assert weights.scale == pytest.approx(8 / 4)
    prefix = f"{KEY_PREFIX}transformer.h.0.attn.c_attn"
    assert torch.equal(weights.lora_a, saved[f"{prefix}.lora_A.weight"])
    assert torch.equal(weights.lora_b, saved[f"{prefix}.lora_B.weight"])
    assert adapter.nbytes == sum(tensor.numel() * 4 for tensor in saved.values())


def test_read_adapter_casts_to_base_dtype(tiny_base_dir: Path, adapter_dir: Path) -> None:
    half_base = load_base_model(str(tiny_base_dir), dtype=torch.bfloat16)

    adapter = read_adapter(adapter_dir, half_base, key="v1")

    for weights in adapter.modules.values():
        assert weights.lora_a.dtype == torch.bfloat16
        assert weights.lora_b.dtype == torch.bfloat16


def test_read_adapter_rslora_scale(
    tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path
) -> None:
    folder = save_lora_adapter(
        tiny_base_dir,
        tmp_path / "rs",
        rank=4,
        lora_alpha=6,
        target_modules=["c_proj"],
        seed=2,
        use_rslora=True,
    )

    adapter = read_adapter(folder, tiny_base, key="rs")

    assert adapter.use_rslora
    for weights in adapter.modules.values():
        assert weights.scale == pytest.approx(6 / math.sqrt(4))


def test_read_adapter_rank_and_alpha_pattern(
    tiny_base: BaseModel, tiny_base_dir: Path, tmp_path: Path
) -> None:
    folder = save_lora_adapter(
        tiny_base_dir,
        tmp_path / "patterned",
        rank=4,
        lora_alpha=8,
        target_modules=["c_attn"],
        seed=3,
        rank_pattern={"h.1.attn.c_attn": 2},
        alpha_pattern={"h.1.attn.c_attn": 3},
    )

    adapter = read_adapter(folder, tiny_base, key="patterned")

    default_module = adapter.modules["transformer.h.0.attn.c_attn"]
    patterned_module = adapter.modules["transformer.h.1.attn.c_attn"]
    assert default_module.rank == 4
    assert default_module.scale == pytest.approx(8 / 4)
    assert patterned_module.rank == 2
    assert patterned_module.scale == pytest.approx(3 / 2)


def test_read_adapter_accepts_matching_sha256(tiny_base: BaseModel, adapter_dir: Path) -> None:
    digest = file_sha256(adapter_dir / ADAPTER_WEIGHTS_NAME)

    adapter = read_adapter(adapter_dir, tiny_base, key="v1", expected_sha256=digest.upper())

    assert adapter.sha256 == digest


def test_read_adapter_rejects_wrong_sha256(tiny_base: BaseModel, adapter_dir: Path) -> None:
    with pytest.raises(AdapterError, match="sha256") as raised:
        read_adapter(adapter_dir, tiny_base, key="v1", expected_sha256="0" * 64)

    assert ADAPTER_WEIGHTS_NAME in str(raised.value)


def test_read_adapter_rejects_missing_folder(tiny_base: BaseModel, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="folder not found"):
        read_adapter(tmp_path / "absent", tiny_base, key="v1")


def test_read_adapter_rejects_missing_weights(
    tiny_base: BaseModel, adapter_dir: Path, tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir, tmp_path)
    (folder / ADAPTER_WEIGHTS_NAME).unlink()

    with pytest.raises(AdapterError, match="weights file not found"):
        read_adapter(folder, tiny_base, key="v1")


def test_read_adapter_rejects_missing_config(
    tiny_base: BaseModel, adapter_dir: Path, tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir, tmp_path)
    (folder / ADAPTER_CONFIG_NAME).unlink()

    with pytest.raises(AdapterError, match="config not found"):
        read_adapter(folder, tiny_base, key="v1")


def test_read_adapter_rejects_corrupt_weights(
    tiny_base: BaseModel, adapter_dir: Path, tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir, tmp_path)
    (folder / ADAPTER_WEIGHTS_NAME).write_bytes(b"not a safetensors file")

    with pytest.raises(AdapterError, match="Could not read adapter weights"):
        read_adapter(folder, tiny_base, key="v1")


def test_read_adapter_rejects_unknown_target_module(
    tiny_base: BaseModel, adapter_dir: Path, tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir, tmp_path)
    edit_config(folder, target_modules=["c_attn", "wte"])

    with pytest.raises(AdapterError, match="unknown modules") as raised:
        read_adapter(folder, tiny_base, key="v1")

    assert "'wte'" in str(raised.value)


def test_read_adapter_rejects_weights_on_untargetable_module(
    tiny_base: BaseModel, adapter_dir: Path, tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir, tmp_path)

    def add_layer_norm_factors(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{KEY_PREFIX}transformer.h.0.ln_1.lora_A.weight"] = torch.zeros(4, 128)
        tensors[f"{KEY_PREFIX}transformer.h.0.ln_1.lora_B.weight"] = torch.zeros(128, 4)

    edit_weights(folder, add_layer_norm_factors)

    with pytest.raises(AdapterError, match="'ln_1' is not a targetable module"):
        read_adapter(folder, tiny_base, key="v1")


def test_read_adapter_rejects_weights_outside_config_targets(
    tiny_base: BaseModel, adapter_dir: Path, tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir, tmp_path)
    edit_config(folder, target_modules=["c_attn"])

    with pytest.raises(AdapterError, match="not in the config's target_modules"):
        read_adapter(folder, tiny_base, key="v1")


def test_read_adapter_rejects_missing_layer(
    tiny_base: BaseModel, adapter_dir: Path, tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir, tmp_path)

    def move_to_layer_five(tensors: dict[str, torch.Tensor]) -> None:
        for name in list(tensors):
            if ".h.1." in name:
                tensors[name.replace(".h.1.", ".h.5.")] = tensors.pop(name)

    edit_weights(folder, move_to_layer_five)

    with pytest.raises(AdapterError, match="has no such module") as raised:
        read_adapter(folder, tiny_base, key="v1")

    assert "transformer.h.5" in str(raised.value)


def test_read_adapter_rejects_shape_mismatch(
    tiny_base: BaseModel, adapter_dir: Path, tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir, tmp_path)
    name = f"{KEY_PREFIX}transformer.h.0.mlp.c_fc.lora_A.weight"
    edit_weights(folder, lambda tensors: tensors.__setitem__(name, torch.ones(4, 64)))

    expected_message = r"lora_A has shape \(4, 64\), expected \(r, 128\)"
    with pytest.raises(AdapterError, match=expected_message) as raised:
        read_adapter(folder, tiny_base, key="v1")

    assert "transformer.h.0.mlp.c_fc" in str(raised.value)


def test_read_adapter_rejects_output_shape_mismatch(
    tiny_base: BaseModel, adapter_dir: Path, tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir, tmp_path)
    name = f"{KEY_PREFIX}transformer.h.1.attn.c_attn.lora_B.weight"
    edit_weights(folder, lambda tensors: tensors.__setitem__(name, torch.ones(128, 4)))

    with pytest.raises(AdapterError, match=r"lora_B has shape \(128, 4\), expected \(384, r\)"):
        read_adapter(folder, tiny_base, key="v1")


def test_read_adapter_rejects_missing_lora_b(
    tiny_base: BaseModel, adapter_dir: Path, tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir, tmp_path)
    name = f"{KEY_PREFIX}transformer.h.0.attn.c_attn.lora_B.weight"
    edit_weights(folder, lambda tensors: tensors.pop(name))

    with pytest.raises(AdapterError, match="lora_B.weight") as raised:
        read_adapter(folder, tiny_base, key="v1")

    assert "transformer.h.0.attn.c_attn" in str(raised.value)


def test_read_adapter_rejects_rank_not_in_config(
    tiny_base: BaseModel, adapter_dir: Path, tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir, tmp_path)
    edit_config(folder, r=8)

    with pytest.raises(AdapterError, match="rank 4, but the config gives r=8"):
        read_adapter(folder, tiny_base, key="v1")


def test_read_adapter_rejects_unexpected_keys(
    tiny_base: BaseModel, adapter_dir: Path, tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir, tmp_path)
    name = f"{KEY_PREFIX}transformer.h.0.attn.c_attn.lora_magnitude_vector"
    edit_weights(folder, lambda tensors: tensors.__setitem__(name, torch.ones(384)))

    with pytest.raises(AdapterError, match="not LoRA factors") as raised:
        read_adapter(folder, tiny_base, key="v1")

    assert "lora_magnitude_vector" in str(raised.value)


def test_read_adapter_rejects_non_lora_config(
    tiny_base: BaseModel, adapter_dir: Path, tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir, tmp_path)
    edit_config(folder, peft_type="IA3")

    with pytest.raises(AdapterError, match="peft_type 'IA3'"):
        read_adapter(folder, tiny_base, key="v1")


@pytest.mark.parametrize(
    ("option", "value"),
    [("use_dora", True), ("modules_to_save", ["lm_head"]), ("bias", "all")],
)
def test_read_adapter_rejects_lora_variants(
    tiny_base: BaseModel, adapter_dir: Path, tmp_path: Path, option: str, value: object
) -> None:
    folder = copy_adapter(adapter_dir, tmp_path)
    edit_config(folder, **{option: value})

    with pytest.raises(AdapterError, match=option):
        read_adapter(folder, tiny_base, key="v1")


def test_read_adapter_rejects_invalid_json(
    tiny_base: BaseModel, adapter_dir: Path, tmp_path: Path
) -> None:
    folder = copy_adapter(adapter_dir, tmp_path)
    (folder / ADAPTER_CONFIG_NAME).write_text("{not json")

    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter(folder, tiny_base, key="v1")


def make_fake_adapter(key: str, nbytes: int) -> LoadedAdapter:
    return LoadedAdapter(
        key=key,
        rank=1,
        alpha=1.0,
        target_modules=("c_attn",),
        modules={},
        nbytes=nbytes,
        load_seconds=0.0,
    )


def load_into(cache: AdapterCache, key: str, nbytes: int = 100) -> tuple[LoadedAdapter, bool]:
    return cache.get_or_load(key, lambda: make_fake_adapter(key, nbytes))


def test_cache_counts_hits_and_misses() -> None:
    cache = AdapterCache(max_adapters=4, max_bytes=10_000)

    first, first_hit = load_into(cache, "a")
    second, second_hit = load_into(cache, "a")

    assert not first_hit
    assert second_hit
    assert second is first
    stats = cache.stats()
    assert stats.hits == 1
    assert stats.misses == 1
    assert stats.loads == 1
    assert stats.count == 1
    assert stats.bytes == 100
    assert stats.evictions == 0


def test_cache_evicts_least_recent_by_count() -> None:
    cache = AdapterCache(max_adapters=2, max_bytes=10_000)
    load_into(cache, "a")
    load_into(cache, "b")
    load_into(cache, "a")  # "b" is now the least recently used

    load_into(cache, "c")

    assert cache.keys() == ["a", "c"]
    assert cache.stats().evictions == 1


def test_cache_evicts_least_recent_by_bytes() -> None:
    cache = AdapterCache(max_adapters=10, max_bytes=250)
    load_into(cache, "a", nbytes=100)
    load_into(cache, "b", nbytes=100)

    load_into(cache, "c", nbytes=120)

    assert cache.keys() == ["b", "c"]
    assert cache.stats().bytes == 220


def test_cache_drops_adapter_larger_than_limit() -> None:
    cache = AdapterCache(max_adapters=10, max_bytes=250)
    load_into(cache, "a", nbytes=100)

    adapter, hit = load_into(cache, "huge", nbytes=1000)

    assert adapter.key == "huge"
    assert not hit
    assert "huge" not in cache
    assert cache.stats().bytes == 0


def test_cache_never_evicts_pinned() -> None:
    cache = AdapterCache(max_adapters=2, max_bytes=10_000)
    cache.pin("a")
    load_into(cache, "a")
    load_into(cache, "b")

    load_into(cache, "c")
    load_into(cache, "d")

    assert cache.keys() == ["a", "d"]
    assert cache.stats().pinned == 1


def test_cache_unpin_makes_evictable() -> None:
    cache = AdapterCache(max_adapters=1, max_bytes=10_000)
    cache.pin("a")
    cache.pin("b")
    load_into(cache, "a")
    load_into(cache, "b")
    assert len(cache) == 2

    cache.unpin("a")

    assert cache.keys() == ["b"]


def test_cache_evict_and_clear() -> None:
    cache = AdapterCache(max_adapters=4, max_bytes=10_000)
    load_into(cache, "a")
    load_into(cache, "b")
    cache.pin("b")

    assert cache.evict("a")
    assert not cache.evict("a")
    assert cache.keys() == ["b"]

    cache.clear()

    stats = cache.stats()
    assert stats.count == 0
    assert stats.bytes == 0
    assert stats.pinned == 0
    assert stats.misses == 2


def test_cache_failed_load_caches_nothing() -> None:
    cache = AdapterCache()

    def fail() -> LoadedAdapter:
        raise AdapterError("broken adapter")

    with pytest.raises(AdapterError, match="broken adapter"):
        cache.get_or_load("a", fail)
    adapter, hit = load_into(cache, "a")

    assert not hit
    assert adapter.key == "a"
    assert cache.stats().loads == 1


def test_cache_loads_once_across_threads() -> None:
    cache = AdapterCache()
    release = threading.Event()
    calls: list[str] = []

    def slow_load() -> LoadedAdapter:
        calls.append("load")
        release.wait(timeout=5)
        return make_fake_adapter("a", 100)

    results: list[tuple[LoadedAdapter, bool]] = []
    def request_adapter() -> None:
        results.append(cache.get_or_load("a", slow_load))

    threads = [threading.Thread(target=request_adapter) for _ in range(4)]
    for thread in threads:
        thread.start()
    release.set()
    for thread in threads:
        thread.join(timeout=5)

    assert calls == ["load"]
    assert len(results) == 4
    assert len({id(adapter) for adapter, _ in results}) == 1
    assert sorted(hit for _, hit in results) == [False, True, True, True]
