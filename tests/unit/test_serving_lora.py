"""Batched multi-LoRA hooks against PEFT and against the untouched base."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from adapters_app.serving.adapters import LoadedAdapter, read_adapter
from adapters_app.serving.base import BaseModel, load_base_model, state_dict_hash
from adapters_app.serving.lora import MultiLoraHooks, build_batch_plan
from tests.unit.test_serving_adapters import save_lora_adapter

# Float32 on CPU: the hooks and PEFT run the same products with different matmul kernels,
# and the tiny base's logits reach magnitudes near 10, so the bound has a relative part.
ATOL = 1e-4
RTOL = 1e-5
SEQUENCE_LENGTH = 7

# Different ranks and target modules, so a mixed batch pads ranks and leaves some modules
# without LoRA for some rows.
ADAPTER_SPECS = {
    "rank2": {"rank": 2, "target_modules": ["c_attn"], "seed": 11},
    "rank4": {"rank": 4, "target_modules": ["c_attn", "c_proj", "c_fc"], "seed": 12},
    "rank8": {"rank": 8, "target_modules": ["c_fc", "c_proj"], "seed": 13, "use_rslora": True},
}


@pytest.fixture(scope="module")
def tiny_base(tiny_base_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_base_dir))


@pytest.fixture(scope="module")
def adapter_dirs(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_adapters")
    return {
        name: save_lora_adapter(tiny_base_dir, root / name, **spec)
        for name, spec in ADAPTER_SPECS.items()
    }


@pytest.fixture(scope="module")
def adapters(tiny_base: BaseModel, adapter_dirs: dict[str, Path]) -> dict[str, LoadedAdapter]:
    return {
        name: read_adapter(folder, tiny_base, key=name) for name, folder in adapter_dirs.items()
    }


@pytest.fixture
def hooks(tiny_base: BaseModel):
    installed = MultiLoraHooks(tiny_base.model)
    yield installed
    installed.remove()


def random_tokens(batch_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (batch_size, SEQUENCE_LENGTH), generator=generator)


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=input_ids).logits


def peft_logits(tiny_base_dir: Path, adapter_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    reference = load_base_model(str(tiny_base_dir)).model
    peft_model = PeftModel.from_pretrained(reference, adapter_dir)
    peft_model.eval()
    return logits_of(peft_model, input_ids)


def run_with_plan(
    base: BaseModel,
    hooks: MultiLoraHooks,
    row_adapters: list[LoadedAdapter | None],
    input_ids: torch.Tensor,
) -> torch.Tensor:
    plan = build_batch_plan(row_adapters, device=base.device, dtype=torch.float32)
    with hooks.activate(plan):
        return logits_of(base.model, input_ids)


@pytest.mark.parametrize("name", sorted(ADAPTER_SPECS))
def test_lora_matches_peft(
    tiny_base: BaseModel,
    tiny_base_dir: Path,
    hooks: MultiLoraHooks,
    adapters: dict[str, LoadedAdapter],
    adapter_dirs: dict[str, Path],
    name: str,
) -> None:
    input_ids = random_tokens(3, seed=1)
    expected = peft_logits(tiny_base_dir, adapter_dirs[name], input_ids)
    base_logits = logits_of(tiny_base.model, input_ids)

    # Rows 0 and 2 use the adapter, row 1 runs the bare base.
    logits = run_with_plan(tiny_base, hooks, [adapters[name], None, adapters[name]], input_ids)

    assert torch.allclose(logits[0], expected[0], atol=ATOL, rtol=RTOL)
    assert torch.allclose(logits[2], expected[2], atol=ATOL, rtol=RTOL)
    assert torch.equal(logits[1], base_logits[1])
    assert not torch.allclose(logits[0], base_logits[0], atol=1e-2), "the adapter changed nothing"


def test_lora_matches_peft_with_rank_pattern(
    tiny_base: BaseModel, tiny_base_dir: Path, hooks: MultiLoraHooks, tmp_path: Path
) -> None:
    folder = save_lora_adapter(
        tiny_base_dir,
        tmp_path / "patterned",
        rank=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_fc"],
        seed=21,
        rank_pattern={"h.1.attn.c_attn": 2},
        alpha_pattern={"h.0.mlp.c_fc": 3},
    )
    adapter = read_adapter(folder, tiny_base, key="patterned")
    input_ids = random_tokens(2, seed=2)

    logits = run_with_plan(tiny_base, hooks, [adapter, adapter], input_ids)

    assert torch.allclose(logits, peft_logits(tiny_base_dir, folder, input_ids), atol=ATOL, rtol=RTOL)


def test_mixed_batch_matches_each_alone(
    tiny_base: BaseModel, hooks: MultiLoraHooks, adapters: dict[str, LoadedAdapter]
) -> None:
    rank2, rank4, rank8 = adapters["rank2"], adapters["rank4"], adapters["rank8"]
    row_adapters = [rank8, None, rank2, rank4, None, rank2]
    input_ids = random_tokens(len(row_adapters), seed=3)

    batched = run_with_plan(tiny_base, hooks, row_adapters, input_ids)
    base_batched = logits_of(tiny_base.model, input_ids)

    for row, adapter in enumerate(row_adapters):
        row_ids = input_ids[row : row + 1]
        if adapter is None:
            alone = logits_of(tiny_base.model, row_ids)
            assert torch.equal(batched[row], base_batched[row]), f"base row {row} changed"
        else:
            alone = run_with_plan(tiny_base, hooks, [adapter], row_ids)
        assert torch.allclose(batched[row], alone[0], atol=ATOL, rtol=RTOL), f"row {row}"


def test_plan_pads_ranks_and_skips_untargeted_rows(adapters: dict[str, LoadedAdapter]) -> None:
    row_adapters = [adapters["rank2"], None, adapters["rank8"], adapters["rank2"]]

    plan = build_batch_plan(row_adapters, device="cpu", dtype=torch.float32)

    assert plan.adapter_keys == ("rank2", "rank8")
    assert plan.row_adapter_keys == ("rank2", None, "rank8", "rank2")
    assert not plan.grouped
    # Only rank2 targets c_attn, so rank8's row gets zero factors there.
    attention = plan.modules["transformer.h.0.attn.c_attn"]
    assert attention.row_slots == [0, -1, -1, 0]
    assert attention.max_rank == 2
    assert attention.a_t.shape == (4, 128, 2)
    assert not attention.a_t[1].any()
    assert not attention.a_t[2].any()
    # Only rank8 targets c_fc.
    mlp = plan.modules["transformer.h.1.mlp.c_fc"]
    assert mlp.row_slots == [-1, -1, 1, -1]
    assert mlp.max_rank == 8
    assert mlp.a_t.shape == (4, 128, 8)
    assert mlp.b_t.shape == (4, 8, 512)
    assert not mlp.b_t[0].any()


def test_rank_padding_adds_zeros_only(adapters: dict[str, LoadedAdapter]) -> None:
    row_adapters = [adapters["rank4"], adapters["rank8"]]
    mixed = build_batch_plan(row_adapters, device="cpu", dtype=torch.float32)

    module = mixed.modules["transformer.h.0.mlp.c_proj"]
    rank4 = adapters["rank4"].modules["transformer.h.0.mlp.c_proj"]

    # rank4 and rank8 (rsLoRA) have different scales, so each is folded into its B.
    assert module.max_rank == 8
    assert module.alpha == 1.0
    assert torch.equal(module.a_t[0, :, :4], rank4.a_t)
    assert torch.equal(module.a_t[0, :, 4:], torch.zeros(512, 4))
    assert torch.allclose(module.b_t[0, :4], rank4.b_t * rank4.scale)
    assert torch.equal(module.b_t[0, 4:], torch.zeros(4, 128))


def test_plan_groups_equal_runs(adapters: dict[str, LoadedAdapter]) -> None:
    rank2, rank4 = adapters["rank2"], adapters["rank4"]

    grouped = build_batch_plan([rank2, rank2, rank4, rank4, None, None], device="cpu", dtype=torch.float32)
    uneven = build_batch_plan([rank2, rank2, rank4, None, None, None], device="cpu", dtype=torch.float32)

    attention = grouped.modules["transformer.h.1.attn.c_attn"]
    assert grouped.grouped
    assert (attention.groups, attention.group_rows) == (3, 2)
    assert attention.row_slots == [0, 0, 1, 1, -1, -1]
    uneven_attention = uneven.modules["transformer.h.1.attn.c_attn"]
    assert not uneven.grouped
    assert (uneven_attention.groups, uneven_attention.group_rows) == (6, 1)


def test_single_adapter_plan_shares_weights(adapters: dict[str, LoadedAdapter]) -> None:
    adapter = adapters["rank4"]

    plan = build_batch_plan([adapter], device="cpu", dtype=torch.float32)

    for path, module in plan.modules.items():
        assert module.a_t.data_ptr() == adapter.modules[path].a_t.data_ptr(), path
        assert module.alpha == adapter.modules[path].scale


def test_grouped_plan_matches_per_row(
    tiny_base: BaseModel, hooks: MultiLoraHooks, adapters: dict[str, LoadedAdapter]
) -> None:
    rank4, rank8 = adapters["rank4"], adapters["rank8"]
    grouped_rows = [rank4, rank4, rank8, rank8, None, None]
    interleaved_rows = [rank4, rank8, None, rank4, rank8, None]
    input_ids = random_tokens(6, seed=8)
    order = [0, 2, 4, 1, 3, 5]  # interleaved row i takes grouped row order[i]

    grouped = run_with_plan(tiny_base, hooks, grouped_rows, input_ids)
    interleaved = run_with_plan(tiny_base, hooks, interleaved_rows, input_ids[order])

    base_logits = logits_of(tiny_base.model, input_ids)
    assert torch.allclose(interleaved, grouped[order], atol=ATOL, rtol=RTOL)
    assert torch.equal(grouped[4], base_logits[4])
    assert not torch.allclose(grouped[0], base_logits[0], atol=1e-2)


def test_hooks_idle_outside_plan(
    tiny_base: BaseModel, adapters: dict[str, LoadedAdapter]
) -> None:
    input_ids = random_tokens(2, seed=4)
    before = logits_of(tiny_base.model, input_ids)
    hooks = MultiLoraHooks(tiny_base.model)
    try:
        idle = logits_of(tiny_base.model, input_ids)
        run_with_plan(tiny_base, hooks, [adapters["rank4"], adapters["rank2"]], input_ids)
        after_plan = logits_of(tiny_base.model, input_ids)
        assert hooks.active_plan is None
    finally:
        hooks.remove()
    removed = logits_of(tiny_base.model, input_ids)

    assert torch.equal(idle, before)
    assert torch.equal(after_plan, before)
    assert torch.equal(removed, before)


def test_base_hash_unchanged(tiny_base: BaseModel, adapters: dict[str, LoadedAdapter]) -> None:
    hooks = MultiLoraHooks(tiny_base.model)
    try:
        row_adapters = [adapters["rank4"], None, adapters["rank8"]]
        run_with_plan(tiny_base, hooks, row_adapters, random_tokens(3, seed=5))
        assert state_dict_hash(tiny_base.model) == tiny_base.weight_hash
    finally:
        hooks.remove()

    assert state_dict_hash(tiny_base.model) == tiny_base.weight_hash
    assert not any(module._forward_hooks for module in tiny_base.model.modules())


def test_plan_applies_to_own_thread_only(
    tiny_base: BaseModel, hooks: MultiLoraHooks, adapters: dict[str, LoadedAdapter]
) -> None:
    input_ids = random_tokens(1, seed=6)
    base_logits = logits_of(tiny_base.model, input_ids)
    plan = build_batch_plan([adapters["rank4"]], device="cpu", dtype=torch.float32)
    other_thread_logits: list[torch.Tensor] = []

    def run_in_other_thread() -> None:
        other_thread_logits.append(logits_of(tiny_base.model, input_ids))

    with hooks.activate(plan):
        thread = threading.Thread(target=run_in_other_thread)
        thread.start()
        thread.join(timeout=30)
        own_logits = logits_of(tiny_base.model, input_ids)

    assert torch.equal(other_thread_logits[0], base_logits)
    assert not torch.allclose(own_logits, base_logits, atol=1e-2)


def test_plan_batch_size_mismatch_raises(
    tiny_base: BaseModel, hooks: MultiLoraHooks, adapters: dict[str, LoadedAdapter]
) -> None:
    plan = build_batch_plan([adapters["rank4"], None], device="cpu", dtype=torch.float32)

    with hooks.activate(plan), pytest.raises(RuntimeError, match="batch of 3 rows"):
        logits_of(tiny_base.model, random_tokens(3, seed=7))


def test_empty_plan_raises() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        build_batch_plan([], device="cpu", dtype=torch.float32)
