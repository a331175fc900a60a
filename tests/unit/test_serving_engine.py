"""Batched generation with per-request adapters on the tiny GPT-2."""

from __future__ import annotations

import dataclasses
import math
import threading
from pathlib import Path

import pytest
import torch

from adapters_app.serving.adapters import AdapterError
from adapters_app.serving.base import BaseModel, load_base_model, state_dict_hash
from adapters_app.serving.engine import (
    Engine,
    GenerationError,
    GenerationRequest,
    GenerationResult,
    filter_top_k,
    filter_top_p,
    stop_prefix_length,
)
from adapters_app.serving.prompting import format_prompt
from tests.unit.test_serving_adapters import save_lora_adapter

ADAPTER_SPECS = {
    "rank2": {"rank": 2, "target_modules": ["c_attn"], "seed": 31},
    "rank4": {"rank": 4, "target_modules": ["c_attn", "c_proj", "c_fc"], "seed": 32},
    "rank8": {"rank": 8, "target_modules": ["c_fc", "c_proj"], "seed": 33, "use_rslora": True},
}


@pytest.fixture(scope="module")
def tiny_base(tiny_base_dir: Path) -> BaseModel:
    return load_base_model(str(tiny_base_dir))


@pytest.fixture(scope="module")
def engine(tiny_base: BaseModel):
    serving_engine = Engine(tiny_base)
    yield serving_engine
    serving_engine.close()


@pytest.fixture(scope="module")
def adapter_dirs(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine_adapters")
    return {
        name: save_lora_adapter(tiny_base_dir, root / name, **spec)
        for name, spec in ADAPTER_SPECS.items()
    }


def request_for(
    adapter_dirs: dict[str, Path], adapter: str | None, prompt: str, **settings: object
) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt,
        adapter_key=adapter,
        adapter_path=adapter_dirs[adapter] if adapter else None,
        **settings,
    )


def same_output(first: GenerationResult, second: GenerationResult) -> bool:
    return (first.text, first.completion_tokens, first.finish_reason) == (
        second.text,
        second.completion_tokens,
        second.finish_reason,
    )


def reference_greedy_ids(model: torch.nn.Module, tokenizer, prompt: str, steps: int) -> list[int]:
    """Greedy decoding without padding or a KV cache: the whole sequence is recomputed each step."""
    ids = tokenizer(format_prompt(prompt), add_special_tokens=False)["input_ids"]
    generated: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids + generated])).logits
            token = int(torch.argmax(logits[0, -1]))
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
    return generated


def test_greedy_alone_matches_mixed_batch(engine: Engine, adapter_dirs: dict[str, Path]) -> None:
    rows = [
        ("rank8", "Write a haiku about autumn leaves", 9),
        (None, "Hi", 12),
        ("rank2", "Summarize: the cat sat on the mat and slept", 7),
        ("rank4", "Hi", 12),
        (None, "Translate to French: good morning, my friend", 5),
        ("rank2", "Q: 2+2?", 10),
    ]
    requests = [
        request_for(adapter_dirs, adapter, prompt, max_new_tokens=max_new_tokens)
        for adapter, prompt, max_new_tokens in rows
    ]

    batched = engine.generate(requests)
    alone = [engine.generate_one(request) for request in requests]

    for index, (in_batch, by_itself) in enumerate(zip(batched, alone)):
        assert same_output(in_batch, by_itself), f"{index}: {in_batch.text!r} != {by_itself.text!r}"
        assert in_batch.adapter_key == requests[index].adapter_key
        assert in_batch.completion_tokens == requests[index].max_new_tokens
        assert in_batch.finish_reason == "length"
    # The same prompt through the base and through rank4 must differ, or the test proves nothing.
    assert batched[1].text != batched[3].text


def test_greedy_matches_uncached_reference(
    engine: Engine, tiny_base: BaseModel, tiny_base_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    from peft import PeftModel

    prompt = "The quick brown fox"
    steps = 8
    reference_model = load_base_model(str(tiny_base_dir)).model
    peft_model = PeftModel.from_pretrained(reference_model, adapter_dirs["rank4"])
    peft_model.eval()
    tokenizer = tiny_base.tokenizer
    adapter_ids = reference_greedy_ids(peft_model, tokenizer, prompt, steps)
    base_ids = reference_greedy_ids(tiny_base.model, tokenizer, prompt, steps)
    expected_adapter = tokenizer.decode(adapter_ids)
    expected_base = tokenizer.decode(base_ids)

    # A longer prompt in the batch forces left padding on the two rows under test.
    results = engine.generate(
        [
            request_for(adapter_dirs, "rank4", prompt, max_new_tokens=steps),
            request_for(adapter_dirs, None, prompt, max_new_tokens=steps),
            request_for(adapter_dirs, "rank8", "A longer prompt pads the others", max_new_tokens=3),
        ]
    )

    assert results[0].text == expected_adapter
    assert results[1].text == expected_base
    assert results[0].prompt_tokens == len(tokenizer(format_prompt(prompt))["input_ids"])


def test_sampling_seeded_matches_alone_and_batched(
    engine: Engine, adapter_dirs: dict[str, Path]
) -> None:
    sampled = request_for(
        adapter_dirs,
        "rank4",
        "Once upon a time",
        temperature=0.9,
        top_k=50,
        top_p=0.9,
        seed=7,
        max_new_tokens=10,
    )
    other = request_for(
        adapter_dirs, "rank2", "Another prompt", temperature=1.2, seed=8, max_new_tokens=6
    )
    greedy = request_for(adapter_dirs, None, "Greedy row", max_new_tokens=4)

    first = engine.generate_one(sampled)
    second = engine.generate_one(sampled)
    batched = engine.generate([greedy, sampled, other])
    reseeded = engine.generate_one(dataclasses.replace(sampled, seed=8))

    assert same_output(first, second)
    assert same_output(first, batched[1])
    assert first.text != reseeded.text


def test_stop_string_trims_text(engine: Engine, adapter_dirs: dict[str, Path]) -> None:
    request = request_for(adapter_dirs, "rank4", "Tell me a story", max_new_tokens=16)
    full_text = engine.generate_one(request).text
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 3]
    assert stop.strip(), f"no usable stop string in {full_text!r}"
    pieces: list[str] = []

    result = engine.generate_one(dataclasses.replace(request, stop=[stop], on_token=pieces.append))

    assert result.text == full_text[: full_text.find(stop)]
    assert result.finish_reason == "stop"
    assert result.completion_tokens < 16
    assert "".join(pieces) == result.text


def test_streaming_pieces_join_to_text(engine: Engine, adapter_dirs: dict[str, Path]) -> None:
    pieces: list[str] = []
    request = request_for(
        adapter_dirs, "rank2", "Stream this", max_new_tokens=10, on_token=pieces.append
    )

    result = engine.generate_one(request)

    assert len(pieces) > 1
    assert "".join(pieces) == result.text


def test_failing_stream_callback_keeps_batch_running(
    engine: Engine, adapter_dirs: dict[str, Path]
) -> None:
    def broken_consumer(piece: str) -> None:
        raise OSError("client disconnected")

    healthy = request_for(adapter_dirs, "rank8", "Healthy row", max_new_tokens=6)
    broken = request_for(
        adapter_dirs, "rank4", "Broken stream", max_new_tokens=6, on_token=broken_consumer
    )

    results = engine.generate([healthy, broken])

    assert results[1].completion_tokens == 6
    assert same_output(results[0], engine.generate_one(healthy))


def test_end_of_text_finishes_row(
    engine: Engine,
    tiny_base: BaseModel,
    adapter_dirs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prompt = "Stop right away"
    first_token = reference_greedy_ids(tiny_base.model, tiny_base.tokenizer, prompt, 1)[0]
    # Treat the base's first greedy token as end-of-text, as if the model had produced it.
    monkeypatch.setattr(engine, "eos_token_id", first_token)
    other = request_for(adapter_dirs, "rank8", "Keep going", max_new_tokens=5)

    results = engine.generate([request_for(adapter_dirs, None, prompt, max_new_tokens=10), other])

    assert results[0].text == ""
    assert results[0].finish_reason == "stop"
    assert results[0].completion_tokens == 1
    assert results[1].completion_tokens >= 1


def test_long_and_short_rows_share_batch(
    engine: Engine, tiny_base: BaseModel, adapter_dirs: dict[str, Path]
) -> None:
    # The long row fills all 1024 positions and finishes first. Its position must stay within
    # the position table while the short row goes on decoding.
    long_prompt = " word" * 1019
    long_tokens = len(tiny_base.tokenizer(format_prompt(long_prompt))["input_ids"])
    long_request = request_for(
        adapter_dirs, "rank2", long_prompt, max_new_tokens=tiny_base.max_positions - long_tokens
    )
    short_request = request_for(adapter_dirs, "rank4", "Short", max_new_tokens=30)

    results = engine.generate([long_request, short_request])

    assert long_request.max_new_tokens < short_request.max_new_tokens
    assert results[0].prompt_tokens + long_request.max_new_tokens == tiny_base.max_positions
    assert results[0].completion_tokens == long_request.max_new_tokens
    assert same_output(results[1], engine.generate_one(short_request))


def test_too_long_prompt_raises(engine: Engine, tiny_base: BaseModel) -> None:
    prompt = " hello" * 1000
    prompt_tokens = len(tiny_base.tokenizer(format_prompt(prompt))["input_ids"])

    with pytest.raises(GenerationError) as raised:
        engine.generate_one(GenerationRequest(prompt=prompt, max_new_tokens=64))

    message = str(raised.value)
    assert f"{prompt_tokens} tokens" in message
    assert "max_new_tokens is 64" in message
    assert str(tiny_base.max_positions) in message


@pytest.mark.parametrize(
    ("settings", "quoted"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"temperature": -0.5}, "temperature=-0.5"),
        ({"temperature": 3.0}, "temperature=3.0"),
        ({"temperature": math.nan}, "temperature=nan"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"top_k": -1}, "top_k=-1"),
        ({"seed": -3}, "seed=-3"),
        ({"stop": [""]}, "stop=['']"),
        ({"adapter_path": Path("/tmp/adapter")}, "without an adapter_key"),
    ],
)
def test_invalid_request_raises(engine: Engine, settings: dict[str, object], quoted: str) -> None:
    request = dataclasses.replace(GenerationRequest(prompt="Hello"), **settings)

    with pytest.raises(GenerationError) as raised:
        engine.generate_one(request)

    assert quoted in str(raised.value)


def test_invalid_request_fails_whole_batch(engine: Engine, adapter_dirs: dict[str, Path]) -> None:
    loads_before = engine.cache.stats().loads

    with pytest.raises(GenerationError, match="top_k=-2"):
        engine.generate(
            [
                GenerationRequest(
                    prompt="Valid", adapter_key="never-loaded", adapter_path=adapter_dirs["rank4"]
                ),
                GenerationRequest(prompt="Invalid", top_k=-2),
            ]
        )

    assert engine.cache.stats().loads == loads_before
    assert "never-loaded" not in engine.cache


def test_unknown_adapter_without_path_raises(engine: Engine) -> None:
    with pytest.raises(GenerationError, match="not loaded and the request has no adapter_path"):
        engine.generate_one(GenerationRequest(prompt="Hello", adapter_key="missing-version"))


def test_wrong_sha256_raises_adapter_error(engine: Engine, adapter_dirs: dict[str, Path]) -> None:
    request = request_for(adapter_dirs, "rank2", "Hello", adapter_sha256="f" * 64)
    request = dataclasses.replace(request, adapter_key="rank2-wrong-hash")

    with pytest.raises(AdapterError, match="sha256"):
        engine.generate_one(request)

    assert "rank2-wrong-hash" not in engine.cache
    after_failure = engine.generate_one(GenerationRequest(prompt="Still serving", max_new_tokens=2))
    assert after_failure.completion_tokens == 2


def test_cache_hit_reported(engine: Engine, adapter_dirs: dict[str, Path]) -> None:
    request = dataclasses.replace(
        request_for(adapter_dirs, "rank4", "Cache me", max_new_tokens=2),
        adapter_key="rank4-cache-test",
    )
    stats_before = engine.cache.stats()

    first = engine.generate_one(request)
    second = engine.generate_one(request)

    assert not first.cache_hit
    assert first.adapter_load_ms > 0
    assert second.cache_hit
    assert same_output(first, second)
    stats = engine.cache.stats()
    assert stats.loads == stats_before.loads + 1
    assert stats.hits == stats_before.hits + 1
    assert "rank4-cache-test" in engine.cache


def test_single_adapter_plan_reused_after_switch(engine: Engine, adapter_dirs: dict[str, Path]) -> None:
    first, _ = engine.load_adapter(request_for(adapter_dirs, "rank4", "a"))
    second, _ = engine.load_adapter(request_for(adapter_dirs, "rank8", "b"))

    plan = engine.plan_for([first])
    engine.plan_for([second])
    again = engine.plan_for([first])
    mixed = engine.plan_for([first, second])

    assert again is plan
    assert mixed is not plan
    assert mixed.batch_size == 2
    # The cached plan reads the adapter's own factors rather than a copy.
    path = next(iter(plan.modules))
    assert plan.modules[path].a_t.data_ptr() == first.modules[path].a_t.data_ptr()


def test_base_hash_unchanged_after_serving(
    tiny_base_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    base = load_base_model(str(tiny_base_dir))
    serving_engine = Engine(base)

    serving_engine.generate(
        [
            request_for(adapter_dirs, "rank8", "One", max_new_tokens=3),
            request_for(adapter_dirs, None, "Two", max_new_tokens=3),
            request_for(adapter_dirs, "rank2", "Three", max_new_tokens=3, temperature=0.7, seed=1),
        ]
    )
    assert state_dict_hash(base.model) == base.weight_hash
    serving_engine.close()

    assert state_dict_hash(base.model) == base.weight_hash
    assert not any(module._forward_hooks for module in base.model.modules())
    assert len(serving_engine.cache) == 0


def test_concurrent_threads_match_sequential(engine: Engine, adapter_dirs: dict[str, Path]) -> None:
    requests = [
        request_for(adapter_dirs, "rank2", "Thread one", max_new_tokens=5),
        request_for(adapter_dirs, "rank8", "Thread two", max_new_tokens=5),
        request_for(adapter_dirs, None, "Thread three", max_new_tokens=5),
    ]
    sequential = [engine.generate_one(request) for request in requests]
    concurrent: dict[int, GenerationResult] = {}

    def serve(index: int) -> None:
        concurrent[index] = engine.generate_one(requests[index])

    threads = [threading.Thread(target=serve, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    for index, expected in enumerate(sequential):
        assert same_output(concurrent[index], expected), f"thread {index}"


def test_empty_request_list_returns_nothing(engine: Engine) -> None:
    assert engine.generate([]) == []


def test_top_k_keeps_k_largest() -> None:
    scores = torch.tensor([1.0, 5.0, 3.0, 4.0])

    filtered = filter_top_k(scores, 2)

    assert filtered.tolist() == [float("-inf"), 5.0, float("-inf"), 4.0]


def test_top_p_keeps_smallest_nucleus() -> None:
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05])

    filtered = filter_top_p(probabilities.log(), 0.75)

    assert torch.isfinite(filtered).tolist() == [True, True, False, False]


def test_stop_prefix_length() -> None:
    assert stop_prefix_length("hello wor", ["world"]) == 3
    assert stop_prefix_length("hello", ["world"]) == 0
    assert stop_prefix_length("ab", ["b", "abc"]) == 2
