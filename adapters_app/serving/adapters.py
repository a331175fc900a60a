"""Read PEFT LoRA adapter folders for the frozen base, and keep recently used ones in memory.

An adapter folder is what `PeftModel.save_pretrained` writes for a GPT-2 LoRA:
`adapter_config.json` and `adapter_model.safetensors`, whose keys look like
`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight` (shape [r, in_features]) and
`...lora_B.weight` (shape [out_features, r]). The weights are validated against the loaded base
so that a bad file fails here, with a readable message, instead of inside a forward pass.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .base import TARGETABLE_MODULES, BaseModel
from .checksum import file_sha256

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

# `base_model.model.<module path>.lora_A.weight`, as PEFT 0.21 saves a LoRA of the default
# adapter (it strips the adapter name from the keys).
WEIGHT_KEY_PATTERN = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$"
)

# LoRA variants and extras of PEFT 0.21's LoraConfig that change the forward pass or add
# weights beyond lora_A/lora_B. Plain LoRA serving cannot reproduce them, so they are rejected.
UNSUPPORTED_OPTIONS = (
    "use_dora",
    "use_qalora",
    "use_bdlora",
    "lora_bias",
    "alora_invocation_tokens",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
)


class AdapterError(ValueError):
    """An adapter folder is missing, malformed or does not fit the base model.

    `key` is the version key the adapter was being read for, when one was given.
    """

    key: str | None = None


class AdapterFileError(AdapterError):
    """The adapter's files are missing, unreadable or differ from the registered sha256.

    A registered adapter that raises this was damaged after it was saved (a disk fault, a
    truncated copy, an edit by hand); the caller decides what to record about it.
    """

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        # True when the folder or a file is absent, as opposed to present but damaged.
        self.missing = missing


@dataclass(frozen=True)
class LoraModuleWeights:
    """LoRA factors for one Conv1D of the base: delta = scale * (x @ lora_a.T) @ lora_b.T.

    The factors are stored transposed, in the layout the batched matmuls read, so building a
    batch plan needs no transpose or copy. `lora_a` and `lora_b` are views in PEFT's layout.
    """

    a_t: torch.Tensor  # [in_features, rank], contiguous
    b_t: torch.Tensor  # [rank, out_features], contiguous, not scaled
    scale: float

    @classmethod
    def from_peft(cls, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> LoraModuleWeights:
        """Build from PEFT's lora_A [rank, in_features] and lora_B [out_features, rank]."""
        return cls(a_t=lora_a.t().contiguous(), b_t=lora_b.t().contiguous(), scale=scale)

    @property
    def lora_a(self) -> torch.Tensor:
        return self.a_t.t()  # [rank, in_features]

    @property
    def lora_b(self) -> torch.Tensor:
        return self.b_t.t()  # [out_features, rank]

    @property
    def rank(self) -> int:
        return int(self.a_t.shape[1])

    @property
    def in_features(self) -> int:
        return int(self.a_t.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.b_t.shape[1])

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.a_t) + tensor_nbytes(self.b_t)


@dataclass(frozen=True)
class LoadedAdapter:
    """A validated LoRA adapter, cast to the base model's dtype and device.

    `rank` is the largest rank of any module (it differs per module only with `rank_pattern`),
    and `alpha` is the config's `lora_alpha`. Each module's own scale is in `modules`.
    """

    key: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    modules: Mapping[str, LoraModuleWeights]
    nbytes: int
    load_seconds: float
    use_rslora: bool = False
    sha256: str = ""
    source: str = ""
    # Plans of batches in which every row uses this adapter, by (rows, device, dtype). Their
    # factors are views of this adapter's own tensors, so they cost no memory, and they go
    # away with the adapter when the cache evicts it.
    single_adapter_plans: dict = field(default_factory=dict, compare=False, repr=False)


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def read_adapter(
    folder: Path,
    base: BaseModel,
    *,
    key: str,
    expected_sha256: str | None = None,
) -> LoadedAdapter:
    """Read and validate a PEFT LoRA folder for `base`, and return its weights ready to serve.

    `key` is the immutable version key the adapter is cached and reported under. When
    `expected_sha256` is given, the safetensors file must have exactly that hash.
    Raises AdapterError, naming the file, key or shape at fault, with `key` set; missing,
    unreadable or changed files raise its subclass AdapterFileError.
    """
    try:
        return _read_adapter(folder, base, key=key, expected_sha256=expected_sha256)
    except AdapterError as error:
        error.key = key
        raise


def _read_adapter(folder: Path, base: BaseModel, *, key: str, expected_sha256: str | None) -> LoadedAdapter:
    started = time.perf_counter()
    folder = Path(folder)

    if not folder.is_dir():
        raise AdapterFileError(f"Adapter folder not found: {folder}", missing=True)
    config_path = folder / ADAPTER_CONFIG_NAME
    weights_path = folder / ADAPTER_WEIGHTS_NAME
    config = read_lora_config(config_path)
    if not weights_path.is_file():
        raise AdapterFileError(f"Adapter weights file not found: {weights_path}", missing=True)

    sha256 = file_sha256(weights_path)
    if expected_sha256 is not None and sha256 != expected_sha256.strip().lower():
        raise AdapterFileError(
            f"Adapter weights {weights_path} have sha256 {sha256}, expected {expected_sha256}. "
            "The file changed after it was registered, so upload or train the adapter again"
        )

    tensors = load_safetensors(weights_path)
    factors = group_lora_factors(tensors, weights_path)

    dtype = next(base.model.parameters()).dtype
    device = base.device
    modules: dict[str, LoraModuleWeights] = {}
    for module_path, (lora_a, lora_b) in sorted(factors.items()):
        check_module_factors(base, module_path, lora_a, lora_b, config, weights_path)

        rank = int(lora_a.shape[0])
        alpha = module_alpha(config, module_path)
        # rsLoRA keeps the update's magnitude stable across ranks by scaling with 1/sqrt(r).
        scale = alpha / math.sqrt(rank) if config["use_rslora"] else alpha / rank
        modules[module_path] = LoraModuleWeights.from_peft(
            lora_a.to(device=device, dtype=dtype), lora_b.to(device=device, dtype=dtype), scale
        )

    target_modules = tuple(sorted({path.rsplit(".", 1)[-1] for path in modules}))
    adapter = LoadedAdapter(
        key=key,
        rank=max(weights.rank for weights in modules.values()),
        alpha=float(config["lora_alpha"]),
        target_modules=target_modules,
        modules=modules,
        nbytes=sum(weights.nbytes for weights in modules.values()),
        load_seconds=time.perf_counter() - started,
        use_rslora=bool(config["use_rslora"]),
        sha256=sha256,
        source=str(folder),
    )
    logger.info(
        "Loaded adapter %s from %s: %d modules, rank %d, %d bytes in %.1f ms",
        key,
        folder,
        len(modules),
        adapter.rank,
        adapter.nbytes,
        adapter.load_seconds * 1000,
    )
    return adapter


def read_lora_config(config_path: Path) -> dict[str, Any]:
    """Parse `adapter_config.json` and raise AdapterError unless it is a plain LoRA we can serve."""
    if not config_path.is_file():
        raise AdapterFileError(f"Adapter config not found: {config_path}", missing=True)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise AdapterFileError(f"Could not read adapter config {config_path}: {error}") from error
    except json.JSONDecodeError as error:
        raise AdapterFileError(f"Adapter config {config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise AdapterError(f"Adapter config {config_path} must be a JSON object")

    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(
            f"Adapter config {config_path} has peft_type {peft_type!r}, "
            "but only 'LORA' adapters are supported"
        )

    for option in UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise AdapterError(
                f"Adapter config {config_path} sets {option}={config[option]!r}, which plain LoRA "
                "serving does not support. Train the adapter without it"
            )
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterError(
            f"Adapter config {config_path} sets bias={bias!r}, but only bias='none' is supported"
        )

    rank = config.get("r")
    if not is_positive_int(rank):
        raise AdapterError(
            f"Adapter config {config_path} has r={rank!r}, expected a positive integer"
        )
    alpha = config.get("lora_alpha")
    if not is_finite_number(alpha):
        raise AdapterError(
            f"Adapter config {config_path} has lora_alpha={alpha!r}, expected a number"
        )
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterError(
            f"Adapter config {config_path} has use_rslora={use_rslora!r}, expected true or false"
        )

    config["target_modules"] = check_target_modules(config.get("target_modules"), config_path)
    config["rank_pattern"] = check_pattern(config, "rank_pattern", config_path, is_positive_int)
    config["alpha_pattern"] = check_pattern(config, "alpha_pattern", config_path, is_finite_number)
    config["use_rslora"] = use_rslora
    return config


def check_target_modules(target_modules: Any, config_path: Path) -> tuple[str, ...] | str:
    """Return the target module names, or a regular expression when PEFT was given one."""
    allowed = ", ".join(TARGETABLE_MODULES)

    # PEFT accepts a string as a regular expression (or "all-linear") over module paths. Which
    # modules it matched is then only visible from the weight keys, which are checked one by one.
    if isinstance(target_modules, str) and target_modules:
        return target_modules

    if not isinstance(target_modules, list) or not target_modules:
        raise AdapterError(
            f"Adapter config {config_path} has target_modules={target_modules!r}, "
            f"expected a non-empty list of module names among {allowed}"
        )
    unknown = [name for name in target_modules if name not in TARGETABLE_MODULES]
    if unknown:
        raise AdapterError(
            f"Adapter config {config_path} targets unknown modules {unknown}, "
            f"but only {allowed} can be targeted on GPT-2"
        )
    return tuple(target_modules)


def check_pattern(
    config: dict[str, Any],
    name: str,
    config_path: Path,
    is_valid: Callable[[Any], bool],
) -> dict[str, Any]:
    pattern = config.get(name) or {}
    if not isinstance(pattern, dict):
        raise AdapterError(
            f"Adapter config {config_path} has {name}={pattern!r}, expected an object"
        )
    for pattern_key, value in pattern.items():
        if not is_valid(value):
            raise AdapterError(
                f"Adapter config {config_path} has {name}[{pattern_key!r}]={value!r}, "
                "which is not a valid value"
            )
    return pattern


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def matching_pattern_key(pattern: Mapping[str, Any], module_path: str) -> str | None:
    """Return the first pattern key that matches the end of `module_path` on a dot boundary.

    This is how PEFT 0.21 resolves `rank_pattern` and `alpha_pattern` keys: a key such as
    `h.1.attn.c_attn` (itself a regular expression) applies to `transformer.h.1.attn.c_attn`.
    """
    for pattern_key in pattern:
        if re.match(rf"(.*\.)?({pattern_key})$", module_path):
            return pattern_key
    return None


def module_rank(config: Mapping[str, Any], module_path: str) -> int:
    pattern_key = matching_pattern_key(config["rank_pattern"], module_path)
    return int(config["rank_pattern"][pattern_key] if pattern_key is not None else config["r"])


def module_alpha(config: Mapping[str, Any], module_path: str) -> float:
    pattern_key = matching_pattern_key(config["alpha_pattern"], module_path)
    if pattern_key is None:
        return float(config["lora_alpha"])
    return float(config["alpha_pattern"][pattern_key])


def load_safetensors(weights_path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise AdapterFileError(f"Could not read adapter weights {weights_path}: {error}") from error


def group_lora_factors(
    tensors: Mapping[str, torch.Tensor], weights_path: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pair each module's lora_A and lora_B tensors, keyed by the module path in the base model."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    unexpected: list[str] = []
    for tensor_key, tensor in tensors.items():
        match = WEIGHT_KEY_PATTERN.match(tensor_key)
        if match is None:
            unexpected.append(tensor_key)
            continue
        halves.setdefault(match["module"], {})[match["factor"]] = tensor

    if unexpected:
        examples = ", ".join(sorted(unexpected)[:3])
        raise AdapterError(
            f"Adapter weights {weights_path} contain {len(unexpected)} keys that are not "
            "LoRA factors (expected 'base_model.model.<module>.lora_A.weight' or "
            f"'...lora_B.weight'), e.g. {examples}"
        )
    if not halves:
        raise AdapterError(f"Adapter weights {weights_path} contain no LoRA weights")

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module_path, pair in halves.items():
        for factor in ("A", "B"):
            if factor not in pair:
                raise AdapterError(
                    f"Adapter weights {weights_path} have no "
                    f"'base_model.model.{module_path}.lora_{factor}.weight' "
                    "to go with its other factor"
                )
        factors[module_path] = (pair["A"], pair["B"])
    return factors


def check_module_factors(
    base: BaseModel,
    module_path: str,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    config: Mapping[str, Any],
    weights_path: Path,
) -> None:
    """Raise AdapterError unless A and B fit the base's Conv1D at `module_path` and the config."""
    from transformers.pytorch_utils import Conv1D

    where = f"Adapter weights {weights_path}, module {module_path}"
    leaf_name = module_path.rsplit(".", 1)[-1]
    if leaf_name not in TARGETABLE_MODULES:
        raise AdapterError(
            f"{where}: {leaf_name!r} is not a targetable module, "
            f"only {', '.join(TARGETABLE_MODULES)} are"
        )
    target_modules = config["target_modules"]
    if isinstance(target_modules, tuple) and leaf_name not in target_modules:
        raise AdapterError(
            f"{where}: {leaf_name!r} has weights but is not in the config's "
            f"target_modules {list(target_modules)}"
        )

    try:
        module = base.model.get_submodule(module_path)
    except AttributeError as error:
        raise AdapterError(f"{where}: the base model {base.model_id} has no such module") from error
    if not isinstance(module, Conv1D):
        raise AdapterError(
            f"{where}: expected a Conv1D in the base model, found {type(module).__name__}"
        )

    # Conv1D stores its weight as [in_features, out_features].
    in_features, out_features = (int(size) for size in module.weight.shape)
    if lora_a.ndim != 2 or lora_b.ndim != 2:
        raise AdapterError(
            f"{where}: lora_A and lora_B must be matrices, "
            f"got shapes {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
        )
    if lora_a.shape[1] != in_features:
        raise AdapterError(
            f"{where}: lora_A has shape {tuple(lora_a.shape)}, expected (r, {in_features}) "
            f"for the base's input size {in_features}"
        )
    if lora_b.shape[0] != out_features:
        raise AdapterError(
            f"{where}: lora_B has shape {tuple(lora_b.shape)}, expected ({out_features}, r) "
            f"for the base's output size {out_features}"
        )
    if lora_a.shape[0] != lora_b.shape[1]:
        raise AdapterError(
            f"{where}: lora_A has rank {lora_a.shape[0]} but lora_B has rank {lora_b.shape[1]}"
        )

    expected_rank = module_rank(config, module_path)
    if lora_a.shape[0] != expected_rank:
        raise AdapterError(
            f"{where}: the weights have rank {lora_a.shape[0]}, "
            f"but the config gives r={expected_rank} for this module (r or rank_pattern)"
        )

    if not lora_a.is_floating_point() or not lora_b.is_floating_point():
        raise AdapterError(
            f"{where}: expected floating point weights, got {lora_a.dtype} and {lora_b.dtype}"
        )
    if not bool(torch.isfinite(lora_a).all()) or not bool(torch.isfinite(lora_b).all()):
        raise AdapterError(f"{where}: the weights contain NaN or infinite values")


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was created, and its current size."""

    hits: int
    misses: int
    loads: int
    evictions: int
    bytes: int
    count: int
    pinned: int
    max_adapters: int
    max_bytes: int


@dataclass
class _CacheEntry:
    adapter: LoadedAdapter
    nbytes: int


class AdapterCache:
    """A thread-safe LRU of loaded adapters, keyed by immutable version key.

    The cache keeps at most `max_adapters` adapters and `max_bytes` bytes of weights. Pinned keys
    are never evicted to make room, so pinned adapters alone may exceed both limits. One thread
    loads a given key at a time, and other threads asking for it wait for that load.
    """

    def __init__(self, max_adapters: int = 32, max_bytes: int = 512 * 1024 * 1024) -> None:
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be at least 1, got {max_adapters}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _CacheEntry] = OrderedDict()
        self._pending: dict[str, threading.Event] = {}
        self._pinned: set[str] = set()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._loads = 0
        self._evictions = 0

    def get_or_load(
        self, key: str, loader: Callable[[], LoadedAdapter]
    ) -> tuple[LoadedAdapter, bool]:
        """Return the adapter for `key` and whether it was cached, calling `loader` on a miss.

        The loader runs without the cache lock held, so hits on other keys are not blocked.
        An exception from the loader propagates and nothing is cached.
        """
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self._hits += 1
                    return entry.adapter, True

                pending = self._pending.get(key)
                is_loader = pending is None
                if is_loader:
                    pending = threading.Event()
                    self._pending[key] = pending
                    self._misses += 1

            if not is_loader:
                # Another thread is loading this key. Look again once it finishes, which is a
                # hit on success and a fresh load attempt if that load failed.
                pending.wait()
                continue

            try:
                adapter = loader()
                with self._lock:
                    self._loads += 1
                    self._insert(key, adapter)
            finally:
                with self._lock:
                    self._pending.pop(key, None)
                pending.set()
            return adapter, False

    def get(self, key: str) -> LoadedAdapter | None:
        """Return the cached adapter for `key` (marking it recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.adapter

    def pin(self, key: str) -> None:
        """Protect `key` from eviction to make room, whether or not it is loaded yet."""
        with self._lock:
            self._pinned.add(key)

    def unpin(self, key: str) -> None:
        """Make `key` evictable again, and evict down to the limits if it was holding them over."""
        with self._lock:
            self._pinned.discard(key)
            self._evict_to_limits()

    def evict(self, key: str) -> bool:
        """Drop `key` and its pin now, and return whether it was cached."""
        with self._lock:
            self._pinned.discard(key)
            if key not in self._entries:
                return False
            self._remove(key)
            return True

    def clear(self) -> None:
        """Drop every adapter and every pin, keeping the counters."""
        with self._lock:
            self._entries.clear()
            self._pinned.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                loads=self._loads,
                evictions=self._evictions,
                bytes=self._bytes,
                count=len(self._entries),
                pinned=len(self._pinned),
                max_adapters=self.max_adapters,
                max_bytes=self.max_bytes,
            )

    def keys(self) -> list[str]:
        """Return the cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _insert(self, key: str, adapter: LoadedAdapter) -> None:
        if key in self._entries:
            self._bytes -= self._entries.pop(key).nbytes
        self._entries[key] = _CacheEntry(adapter=adapter, nbytes=adapter.nbytes)
        self._bytes += adapter.nbytes
        self._evict_to_limits()

    def _evict_to_limits(self) -> None:
        # Oldest first. The entry just inserted is the newest, so it goes only when it alone
        # (with the pinned entries) is over a limit, and the caller still gets it for this request.
        for key in list(self._entries):
            if not self._over_limits():
                return
            if key in self._pinned:
                continue
            self._remove(key)
        if self._over_limits():
            logger.warning(
                "Adapter cache is over its limits with only pinned adapters left: "
                "%d adapters, %d bytes (limits %d adapters, %d bytes)",
                len(self._entries),
                self._bytes,
                self.max_adapters,
                self.max_bytes,
            )

    def _over_limits(self) -> bool:
        return len(self._entries) > self.max_adapters or self._bytes > self.max_bytes

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
        self._evictions += 1
        logger.info("Evicted adapter %s from the cache (%d bytes)", key, entry.nbytes)
