"""Saving and loading the sparse adapter set: JSON + safetensors, never pickles.

`sla_adapter_config.json` describes the set (format, backbone, SLA config, site structure, tensor digest);
`sla_adapter_model.safetensors` holds only adapters, gates, heads and mix tables, and in its header the sha256
of that whole description. Loading refuses a file of another format or version, another backbone, wrong
shapes, tensors whose digest does not match, or a description changed after saving (an activation, the
pooling, a site: anything but the tensor digest itself).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sla_core.adapters import adapter_state, is_adapter_key
from sla_core.config import SLAConfig
from sla_core.files import atomic_folder, sha256_file
from sla_core.inject import SiteSpec

if TYPE_CHECKING:
    from sla_core.model import SLAModel

FORMAT = "sla-adapters"
FORMAT_VERSION = 1
# Our own names: PEFT's (adapter_config.json, adapter_model.safetensors) hold another schema, and PEFT's and
# transformers' loaders would take our files for theirs.
CONFIG_NAME = "sla_adapter_config.json"
WEIGHTS_NAME = "sla_adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
DESCRIPTION_KEY = "description_sha256"  # in the safetensors header
REQUIRED = {"pruned": bool, "backbone": dict, "sla_config": dict, "sites": list, "sha256": str}


class AdapterFileError(ValueError):
    """An adapter set that cannot be loaded: foreign, tampered, or for another backbone."""


def backbone_signature(base: torch.nn.Module, name: str = "") -> dict[str, Any]:
    """What identifies a backbone: its name plus the shape facts adapters depend on."""
    cfg = base.config
    return {
        "name_or_path": name or str(getattr(cfg, "name_or_path", "") or ""),
        "model_type": getattr(cfg, "model_type", ""),
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(getattr(cfg, "num_hidden_layers", 0) or 0),
        "vocab_size": int(getattr(cfg, "vocab_size", 0) or 0),
    }


def save_adapters(model: SLAModel, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter set to the folder `path` atomically (a temp folder renamed into place).

    The folder is replaced as a whole; `save_adapter_files` writes into a folder that holds other files.
    """
    with atomic_folder(path) as tmp:
        _write_set(model, tmp, extra)
    return Path(path)


def save_adapter_files(model: SLAModel, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter set's two files into the folder `path`, keeping whatever else it holds (a Trainer
    checkpoint, a tokenizer). Each file is renamed into place whole."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sla-adapters.", dir=out))
    try:
        _write_set(model, tmp, extra)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_merged(model: SLAModel, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write a merged model (`SLAModel.merge`) to the folder `path`, atomically: the backbone with the
    LoRA-type units folded into its weights, in Hugging Face's format with its tokenizer (so `AutoModel` and
    `load_backbone` read the folder), plus the set's own two files for what stays outside the weights
    (task heads, bottleneck adapters), whose description says `merged` and so names this folder as its
    backbone. `SLAModel.from_pretrained(path)` loads it."""
    from sla_core.backbones import load_tokenizer, save_backbone

    if not model.merged:
        raise ValueError("save_merged needs a merged model: call prune() then merge()")
    wrapped = {site.spec.module for site in model.site_modules}
    state = {}  # the backbone's own weights under their own names: adapter wrappers stripped
    for key, value in model.backbone.state_dict().items():
        if is_adapter_key(key):
            continue
        module = key.rsplit(".base_layer.", 1)[0]
        state[key.replace(".base_layer.", ".", 1) if module in wrapped else key] = value
    with atomic_folder(path) as tmp:
        save_backbone(model.backbone, tmp, state_dict=state)
        load_tokenizer(model.backbone_name).save_pretrained(tmp)
        _write_set(model, tmp, extra, merged=True)
    return Path(path)


def backbone_source(folder: str | os.PathLike, meta: dict[str, Any]) -> str:
    """What `load_backbone` must load for the set at `folder`: the folder itself for a merged model, else
    the backbone its description names."""
    return str(folder) if meta.get("merged") else str(meta["backbone"].get("name_or_path") or "")


def _write_set(model: SLAModel, folder: Path, extra: dict[str, Any] | None, merged: bool = False) -> None:
    if model.merged and not merged:
        raise ValueError(
            "this model's LoRA-type units are merged into the backbone's weights, which an adapter set "
            "does not hold: save it with sla_core.io.save_merged (or `sla prune --merge`), or save the "
            "set before merge()"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in adapter_state(model).items()}
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"refusing to save empty tensors {empty[:3]} (gather ZeRO-3 parameters first)")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pruned": model.pruned,
        "backbone": backbone_signature(model.backbone, model.backbone_name),
        "sla_config": model.config.to_dict(),
        "sites": [s.to_dict() for s in model.sites if not model.merged or any(s.pools.values())],
        "parameter_counts": model.parameter_counts(),
        "extra": extra or {},
    }
    if model.merged:  # the LoRA-type units live in the backbone's weights saved beside this set
        meta["merged"] = True
    header = {"format": FORMAT, DESCRIPTION_KEY: description_digest(meta)}
    save_file(state, str(folder / WEIGHTS_NAME), metadata=header)
    meta["sha256"] = sha256_file(folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2))


def description_digest(meta: dict[str, Any]) -> str:
    """sha256 of an adapter set's description: every key of its config file but the tensor digest."""
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_description(folder: Path, meta: dict[str, Any]) -> None:
    """Required keys present, and the description is the one sealed in the weights' header."""
    cfg_file, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    missing = [k for k, kind in REQUIRED.items() if not isinstance(meta.get(k), kind)]
    if missing:
        raise AdapterFileError(
            f"{cfg_file}: lacks {', '.join(f'`{k}`' for k in missing)} (or has the wrong type); the file "
            "was edited or cut short: save the adapter set again"
        )
    if not weights.is_file():
        raise AdapterFileError(f"{weights}: not found (only safetensors are read; pickles are never loaded)")
    try:
        with safe_open(str(weights), framework="pt") as f:
            sealed = (f.metadata() or {}).get(DESCRIPTION_KEY)
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(f"{weights}: unreadable safetensors ({err})") from err
    if sealed is None:
        raise AdapterFileError(
            f"{weights}: no description digest in its header (saved by an older sla); save the set again"
        )
    if sealed != description_digest(meta):
        raise AdapterFileError(
            f"{cfg_file}: the description differs from the one saved with the weights (an activation, the "
            "pooling, a site, the structure or the version was changed after saving); restore the file or "
            "save the set again"
        )


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check `sla_adapter_config.json` against the digest sealed in the weights' header.

    Raises:
        AdapterFileError: naming the problem (missing keys, a changed description, another format).
    """
    folder = Path(path)
    cfg_file = folder / CONFIG_NAME
    if not cfg_file.is_file():
        _refuse_peft_names(folder)
        raise AdapterFileError(
            f"{cfg_file}: not found; an sla adapter set is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{cfg_file}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        hint = " (this looks like a PEFT adapter)" if isinstance(meta, dict) and "peft_type" in meta else ""
        raise AdapterFileError(f"{cfg_file}: not an sla adapter set, 'format' is not {FORMAT!r}{hint}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"{cfg_file}: format_version {meta.get('format_version')!r}; "
            f"this sla reads version {FORMAT_VERSION}"
        )
    _check_description(folder, meta)
    return meta


def _refuse_peft_names(folder: Path) -> None:
    """A folder under PEFT's file names: PEFT's own adapter, or a set saved by an sla before the rename."""
    peft_file = folder / PEFT_CONFIG_NAME
    if not peft_file.is_file():
        return
    try:
        meta = json.loads(peft_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = None
    if isinstance(meta, dict) and meta.get("format") == FORMAT:
        raise AdapterFileError(
            f"{folder}: an sla adapter set saved under PEFT's file names by an older sla; rename "
            f"{PEFT_CONFIG_NAME} to {CONFIG_NAME} and adapter_model.safetensors to {WEIGHTS_NAME}"
        )
    raise AdapterFileError(
        f"{peft_file}: this is a PEFT adapter, not an sla adapter set; load it with peft "
        "(peft.PeftModel.from_pretrained(backbone, folder))"
    )


def load_adapters(backbone: torch.nn.Module, path: str | os.PathLike) -> SLAModel:
    """Attach the saved adapter set at `path` to a fresh `backbone` and load its tensors.

    Raises:
        AdapterFileError: foreign format, other version, other backbone, tampered or mis-shaped tensors.
    """
    from sla_core.model import attach

    folder = Path(path)
    meta = read_adapter_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterFileError(f"{weights}: not found (only safetensors are read; pickles are never loaded)")
    if sha256_file(weights) != meta.get("sha256"):
        raise AdapterFileError(f"{weights}: contents do not match the sha256 in {CONFIG_NAME} (file changed)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(f"{weights}: unreadable safetensors ({err})") from err
    try:
        config = SLAConfig.from_dict(meta["sla_config"])
        sites = [SiteSpec(**s) for s in meta["sites"]]
    except (TypeError, ValueError, KeyError) as err:
        raise AdapterFileError(f"{folder / CONFIG_NAME}: bad `sla_config` or `sites` ({err})") from err
    base = backbone.base_model if hasattr(backbone, "base_model") else backbone
    _check_backbone(base, meta["backbone"], folder)
    try:
        model = (
            attach(backbone, config, sites=sites)
            if meta["pruned"]
            else _attach_unpruned(backbone, config, sites)
        )
    except ValueError as err:
        raise AdapterFileError(f"{folder}: {err}") from err
    try:
        model.load_sla_state(state)
    except ValueError as err:
        raise AdapterFileError(f"{weights}: {err}") from err
    model.backbone_name = meta["backbone"]["name_or_path"]
    return model.eval()


def _attach_unpruned(backbone, config: SLAConfig, sites: list[SiteSpec]) -> SLAModel:
    from sla_core.model import attach

    model = attach(backbone, config)
    if [s.module for s in model.sites] != [s.module for s in sites]:
        raise AdapterFileError("the saved sites do not exist in this backbone")
    return model


def _check_backbone(base: torch.nn.Module, saved: dict[str, Any], folder: Path) -> None:
    here = backbone_signature(base)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    diff = {k: (saved.get(k), here[k]) for k in keys if saved.get(k) != here[k]}
    if diff:
        raise AdapterFileError(
            f"{folder}: saved for backbone {saved.get('name_or_path')!r}, which differs from this one: "
            + ", ".join(f"{k} saved {a} vs {b}" for k, (a, b) in diff.items())
        )
