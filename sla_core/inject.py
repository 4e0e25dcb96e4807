"""Finding candidate sites in a Hugging Face backbone and wrapping them with adapter pools.

A site is a linear projection. Output projections (attention output, feed-forward output) have up to two
bottleneck candidate paths: *sequential* (an adapter on the projection's output) and *parallel* (an adapter
from the sublayer's input, captured by a forward pre-hook on the sublayer, added to the projection's
output). With the `lora` path, every attention projection (q, k, v, o; GPT-2's fused `c_attn`) and the
feed-forward in and out projections also carry a *LoRA-type* candidate: a bias-free low-rank linear delta
from the projection's own input, the structure LoRA trains.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from sla_core.adapters import AdapterPool

# (projection suffix, sublayer-input suffix, site kind): the sublayer input module is found by replacing
# the projection suffix with the input suffix. Order matters: the first match wins.
DEFAULT_SITES: list[tuple[str, str, str]] = [
    ("attention.output.dense", "attention", "attn"),  # BERT, RoBERTa, MiniLM, ELECTRA
    ("output.dense", "intermediate", "ffn"),
    ("attention.out_lin", "attention", "attn"),  # DistilBERT
    ("ffn.lin2", "ffn", "ffn"),
    ("attn.c_proj", "attn", "attn"),  # GPT-2
    ("mlp.c_proj", "mlp", "ffn"),
    ("self_attn.o_proj", "self_attn", "attn"),  # Llama, Qwen, Mistral, Gemma, Phi-3
    ("mlp.down_proj", "mlp", "ffn"),
]
# (projection suffix, kind) of the LoRA-type candidates; the first match wins.
LORA_SITES: list[tuple[str, str]] = [
    ("attention.self.query", "q"),  # BERT, RoBERTa, MiniLM, ELECTRA
    ("attention.self.key", "k"),
    ("attention.self.value", "v"),
    ("attention.output.dense", "attn"),
    ("intermediate.dense", "ffn_in"),
    ("output.dense", "ffn"),
    ("attention.q_lin", "q"),  # DistilBERT
    ("attention.k_lin", "k"),
    ("attention.v_lin", "v"),
    ("attention.out_lin", "attn"),
    ("ffn.lin1", "ffn_in"),
    ("ffn.lin2", "ffn"),
    ("attn.c_attn", "qkv"),  # GPT-2
    ("attn.c_proj", "attn"),
    ("mlp.c_fc", "ffn_in"),
    ("mlp.c_proj", "ffn"),
    ("self_attn.q_proj", "q"),  # Llama, Qwen, Mistral, Gemma, Phi-3
    ("self_attn.k_proj", "k"),
    ("self_attn.v_proj", "v"),
    ("self_attn.o_proj", "attn"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_in"),
    ("mlp.down_proj", "ffn"),
]
PATH_TAG = {"sequential": "seq", "parallel": "par", "lora": "lora"}
POOL_ATTR = {"sequential": "sla_seq", "parallel": "sla_par", "lora": "sla_lora"}
PATHS = tuple(PATH_TAG)


@dataclass
class SiteSpec:
    """Where one site is and what it holds; `pools[path]` is the pool size K (0 = removed)."""

    module: str
    input_module: str | None
    kind: str
    layer: int
    in_dim: int
    out_dim: int
    pools: dict[str, int] = field(default_factory=dict)
    candidates: dict[str, int] = field(default_factory=dict)  # path -> candidate index in the gate table
    allowed: list[str] = field(default_factory=list)  # paths this site can carry (empty: seq and par)

    def candidate_name(self, path: str) -> str:
        return f"layer{self.layer}.{self.kind}.{PATH_TAG[path]}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 style Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:
        return weight.shape[0], weight.shape[1]  # Conv1D stores (in, out)
    raise TypeError(f"{type(module).__name__} is not a linear layer; adapters attach to nn.Linear or Conv1D")


def _layer_index(name: str) -> int:
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else 0


def find_sites(
    model: nn.Module, target_modules: str | list[str] | None, paths: tuple[str, ...]
) -> list[SiteSpec]:
    """Sites of `model` (a base model), each with the paths it `allowed` to carry. Raises ValueError listing
    the module names when nothing matches."""
    names = dict(model.named_modules())
    bottleneck = [p for p in paths if p != "lora"]
    sites: list[SiteSpec] = []
    for name, module in names.items():
        if not name:
            continue
        spec = _match(name, target_modules) if bottleneck else None
        lora_kind = _lora_match(name, target_modules) if "lora" in paths else None
        if spec is None and lora_kind is None:
            continue
        if spec is None:
            in_dim, out_dim = linear_dims(module)
            sites.append(
                SiteSpec(name, None, lora_kind, _layer_index(name), in_dim, out_dim, allowed=["lora"])
            )
            continue
        input_module, kind = spec
        if input_module is not None and input_module not in names:
            input_module = None
        try:
            in_dim, out_dim = linear_dims(module)
        except TypeError as err:
            raise ValueError(f"target module {name!r}: {err}") from err
        if input_module is not None:
            in_dim = _input_dim(model, name, out_dim)
        allowed = bottleneck + (["lora"] if lora_kind is not None else [])
        sites.append(SiteSpec(name, input_module, kind, _layer_index(name), in_dim, out_dim, allowed=allowed))
    if not sites:
        linear = [
            n for n, m in names.items() if n and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
        ]
        shown = ", ".join(linear[:40]) + (" ..." if len(linear) > 40 else "")
        what = "the default sites" if target_modules is None else f"target_modules={target_modules!r}"
        raise ValueError(
            f"No adapter site matched {what} in {type(model).__name__}. Linear modules that exist: {shown}. "
            "Pass target_modules as a regex or a list of name suffixes."
        )
    return sites


def _match(name: str, target_modules: str | list[str] | None) -> tuple[str | None, str] | None:
    if target_modules is None:
        for proj, inp, kind in DEFAULT_SITES:
            if name == proj or name.endswith("." + proj):
                return name[: len(name) - len(proj)] + inp, kind
        return None
    if isinstance(target_modules, str):
        return (None, _kind_of(name)) if re.fullmatch(target_modules, name) else None
    for suffix in target_modules:
        if name == suffix or name.endswith("." + suffix):
            return None, _kind_of(name)
    return None


def _lora_match(name: str, target_modules: str | list[str] | None) -> str | None:
    """The kind of a LoRA-type site (`q`, `v`, `attn`, `ffn_in`, ...), or None."""
    if target_modules is not None:
        found = _match(name, target_modules)
        return found[1] if found is not None else None
    for suffix, kind in LORA_SITES:
        if name == suffix or name.endswith("." + suffix):
            return kind
    return None


def _kind_of(name: str) -> str:
    return name.split(".")[-1].replace("_", "")


def _input_dim(model: nn.Module, name: str, out_dim: int) -> int:
    # Sublayer inputs of the default sites are hidden states of the residual stream.
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    return int(hidden) if hidden else out_dim


class SLASite(nn.Module):
    """Wraps an output projection; adds gated sequential and parallel adapter pools to its output."""

    def __init__(self, base_layer: nn.Module, spec: SiteSpec, context: GateContext, make_pool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.spec = spec
        self._context = context
        self.sla_seq: AdapterPool | None = None
        self.sla_par: AdapterPool | None = None
        self.sla_lora: AdapterPool | None = None
        if spec.pools.get("sequential", 0) > 0:
            self.sla_seq = make_pool(spec.out_dim, spec.out_dim, spec.pools["sequential"], "sequential")
        if spec.pools.get("parallel", 0) > 0:
            in_dim = spec.in_dim if spec.input_module is not None else linear_dims(base_layer)[0]
            self.sla_par = make_pool(in_dim, spec.out_dim, spec.pools["parallel"], "parallel")
        if spec.pools.get("lora", 0) > 0:
            self.sla_lora = make_pool(linear_dims(base_layer)[0], spec.out_dim, spec.pools["lora"], "lora")
        self._par_input: torch.Tensor | None = None

    def pools(self) -> list[tuple[str, AdapterPool]]:
        """(path, pool) of every pool this site carries."""
        found = ((path, getattr(self, attr)) for path, attr in POOL_ATTR.items())
        return [(path, pool) for path, pool in found if pool is not None]

    def capture_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._par_input = args[0] if args else kwargs.get("hidden_states")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)  # (B, T, out)
        ctx = self._context
        if ctx.disabled:
            return y
        parts = []
        cands = self.spec.candidates
        if self.sla_seq is not None and ctx.runs(cands.get("sequential"), self.sla_seq):
            parts.append(self.sla_seq(y, ctx.gates_for(cands.get("sequential")), ctx.task_ids))
        if self.sla_par is not None:
            source = x if self.spec.input_module is None else self._par_input
            self._par_input = None
            if ctx.runs(cands.get("parallel"), self.sla_par):
                parts.append(self.sla_par(source, ctx.gates_for(cands.get("parallel")), ctx.task_ids))
        if self.sla_lora is not None and ctx.runs(cands.get("lora"), self.sla_lora):
            parts.append(self.sla_lora(x, ctx.gates_for(cands.get("lora")), ctx.task_ids))
        if not parts:
            return y
        h = torch.cat([p[0] for p in parts], dim=-1) if len(parts) > 1 else parts[0][0]  # (B, T, H)
        up = torch.cat([p[1] for p in parts], dim=1) if len(parts) > 1 else parts[0][1]  # (out, H)
        h = h.reshape(-1, h.shape[-1])
        if not torch.is_grad_enabled() and y.is_contiguous():
            # inference: one pass over the fresh output, in place (the sequential path has read y already)
            y.view(-1, y.shape[-1]).addmm_(h, up.t())
            return y
        return torch.addmm(y.reshape(-1, y.shape[-1]), h, up.t()).view_as(y)  # y + h @ up.T


class GateContext:
    """Per-forward state shared by all sites: the per-example gate values and task ids."""

    def __init__(self) -> None:
        self.gates: torch.Tensor | None = None  # (B, C, K) or None after pruning
        self.task_ids: torch.Tensor | None = None
        self.disabled = False
        # Per candidate, whether the decided structure closes it for the whole batch (fixed-structure
        # phase and evaluation): such a pool adds exactly zero, so it is not run. None: run every pool.
        self.closed: list[bool] | None = None

    def runs(self, candidate: int | None, pool: nn.Module) -> bool:
        """Whether `pool` (of `candidate`) must run in this forward. ZeRO-3 partitioned pools always run, so
        that every rank gathers the same parameters in the same order."""
        if self.closed is None or candidate is None or not self.closed[candidate]:
            return True
        return any(hasattr(p, "ds_id") for p in pool.parameters())

    def gates_for(self, candidate: int | None) -> torch.Tensor | None:
        if self.gates is None or candidate is None:
            return None
        return self.gates[:, candidate, :]  # (B, K)


def wrap_sites(model: nn.Module, sites: list[SiteSpec], context: GateContext, make_pool) -> list[SLASite]:
    """Replace each site's projection with an `SLASite` in place and hook the sublayer inputs."""
    wrapped = []
    for spec in sites:
        parent_name, _, child = spec.module.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            base = getattr(parent, child)
        except AttributeError:
            raise ValueError(f"site {spec.module!r} does not exist in {type(model).__name__}") from None
        if isinstance(base, SLASite):
            raise ValueError(f"{spec.module} already carries adapters; attach to a fresh backbone")
        site = SLASite(base, spec, context, make_pool)
        setattr(parent, child, site)
        if site.sla_par is not None and spec.input_module is not None:
            model.get_submodule(spec.input_module).register_forward_pre_hook(
                site.capture_input, with_kwargs=True
            )
        wrapped.append(site)
    return wrapped


def unwrap_sites(model: nn.Module) -> nn.Module:
    """Undo `wrap_sites` in place: restore the original projections and drop the input hooks."""
    for module in list(model.modules()):
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(getattr(hook, "__self__", None), SLASite):
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
    for name, module in list(model.named_modules()):
        if isinstance(module, SLASite):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base_layer)
    return model
