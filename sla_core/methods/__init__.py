"""Training methods: ours and the baselines, all trained by the engine's one loop.

A method is named by a spec string, `name` or `name:key=value,key=value` (`lora:r=4`, `full_ft:lr=1e-4`,
`sla:lambda_sparse=0.5`); list values join with `+` (`lora:targets=query+value`). Add a method with one
class implementing `Method` and one `register_method` line (docs/extending.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from sla_core.methods.base import Method, trainable_keys, trainable_params
from sla_core.methods.baselines import SET_CONFIG, FullFineTuning, LoRA, PrefixTuning, load_method_set
from sla_core.methods.ours import FixedAdapters, RandomStructure, StructureLearned

METHODS: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Make `cls` (a `Method` dataclass with a `name`) available to configs, `sla compare` and bench."""
    METHODS[cls.name] = cls
    return cls


for _cls in (StructureLearned, FixedAdapters, RandomStructure, LoRA, PrefixTuning, FullFineTuning):
    register_method(_cls)


def parse_method(spec: str) -> Method:
    """The method a spec string names.

    Raises:
        ValueError: naming the unknown method or option and what is known.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"method {spec!r}: give a name such as {sorted(METHODS)[0]!r}")
    name, _, rest = spec.strip().partition(":")
    if name not in METHODS:
        raise ValueError(f"method {name!r} is unknown; choose one of {sorted(METHODS)}")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"method {spec!r}: option {item!r} is not KEY=VALUE (e.g. lora:r=4)")
        options[key.strip()] = _value(value.strip())
    cls = METHODS[name]
    if issubclass(cls, StructureLearned):
        lr = options.pop("lr", None)
        options = {"options": options, "lr": lr}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"method {spec!r}: unknown option(s) {unknown}; {name} takes {sorted(known)}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as err:
        raise ValueError(f"method {spec!r}: {err}") from None


def _value(text: str) -> Any:
    """An option value: a number (`1e-4` too, which YAML 1.1 reads as text), a `+`-joined list, or YAML."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    if "+" in text:
        return [_value(part) for part in text.split("+")]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_trained(backbone: nn.Module, path: str | Path) -> tuple[Method, nn.Module]:
    """Rebuild a saved set (ours, pruned or not, or a baseline's) over a fresh `backbone`."""
    from sla_core.io import AdapterFileError, load_adapters, read_adapter_config

    folder = Path(path)
    if (folder / SET_CONFIG).is_file():
        import json

        meta = json.loads((folder / SET_CONFIG).read_text(encoding="utf-8"))
        return parse_method(meta["method"]), load_method_set(backbone, folder, meta)
    if not folder.is_dir():
        raise AdapterFileError(f"{folder}: not a folder; give an adapter set folder")
    meta = read_adapter_config(folder)
    method = parse_method(meta.get("extra", {}).get("method", "sla"))
    return method, load_adapters(backbone, folder)


__all__ = [
    "METHODS",
    "Method",
    "load_trained",
    "parse_method",
    "register_method",
    "trainable_keys",
    "trainable_params",
]
