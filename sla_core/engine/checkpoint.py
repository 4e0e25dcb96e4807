"""Self-describing, atomic training checkpoints.

Layout under `<run_dir>/checkpoints/`:

    latest                  text: the name of the last complete checkpoint
    step-0000020/
        meta.json           format, step, world size, the experiment config, dataset refs, sampler state,
                            the λ warm-up counter and the last training metrics
        manifest.json       sha256 of every other file; checked before anything is loaded on resume
        adapters/           the full (unpruned) trained set: `sla_core.methods.load_trained(backbone, this)`
        engine/             DeepSpeed's optimizer and trainable-weight state, per rank (no frozen weights)

A checkpoint is written under `.tmp-step-…` and renamed into place only when every rank has finished, and
`latest` is replaced after the rename, so a write killed half-way never replaces the last good one. RNG
state is not stored: every step reseeds from (seed, step), so a resumed run draws the same noise.
DeepSpeed's engine files are pickles (loading one can run code): `load` refuses a checkpoint whose files do
not match its manifest exactly (a file changed, truncated, missing or added).
Multi-node runs need `run_dir` on a filesystem all nodes share.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sla_core.engine import ds
from sla_core.experiment import ExperimentConfig
from sla_core.files import atomic_write_text, sha256_file
from sla_core.methods import Method, trainable_params

FORMAT = "sla-checkpoint"
FORMAT_VERSION = 1
LATEST = "latest"
META = "meta.json"
ADAPTERS = "adapters"
ENGINE = "engine"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "sla-checkpoint-manifest"
KEEP = 2  # complete checkpoints kept; older ones are removed after a new one is committed


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, foreign, or does not fit the current run."""


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint on disk."""

    path: str
    step: int


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def read_meta(path: str | Path) -> dict[str, Any]:
    """`meta.json` of the checkpoint folder `path`, checked for format and version."""
    file = Path(path) / META
    if not file.is_file():
        raise CheckpointError(
            f"{path}: not a complete checkpoint (no {META}); pass a checkpoints/step-* folder"
        )
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from err
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: not an {FORMAT} version {FORMAT_VERSION} checkpoint")
    return meta


def latest_checkpoint(root: str | Path) -> CheckpointRef | None:
    """The checkpoint `root/latest` names, or None when there is none yet."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text(encoding="utf-8").strip()
    meta = read_meta(folder)
    return CheckpointRef(str(folder), int(meta["step"]))


def resolve_checkpoint(path: str | Path) -> CheckpointRef:
    """A checkpoint folder, a `checkpoints/` folder (its latest) or a run folder (its latest)."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file():
            ref = latest_checkpoint(root)
            assert ref is not None
            return ref
    return CheckpointRef(str(path), int(read_meta(path)["step"]))


def _files(folder: Path) -> dict[str, Path]:
    """Every entry below `folder` except the manifest, by its relative POSIX path (folders excluded)."""
    return {
        p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.name != MANIFEST or p.parent != folder
        if p.is_symlink() or not p.is_dir()
    }


def write_manifest(folder: str | Path) -> Path:
    """Write `manifest.json`: the sha256 of every file of the checkpoint folder (rank 0, before commit).

    Also the way to vouch for a checkpoint written before manifests existed, if you trust every file in it.
    """
    folder = Path(folder)
    body = {"format": MANIFEST_FORMAT, "files": {name: sha256_file(p) for name, p in _files(folder).items()}}
    atomic_write_text(folder / MANIFEST, json.dumps(body, indent=2, sort_keys=True) + "\n")
    return folder / MANIFEST


def verify_manifest(folder: str | Path) -> None:
    """Refuse a checkpoint whose files differ from its manifest: changed, truncated, missing or added.

    Raises:
        CheckpointError: naming the files and the fix.
    """
    folder = Path(folder)
    file = folder / MANIFEST
    fix = (
        "nothing was loaded. Its engine files are pickles, which can run code: resume only from "
        "checkpoints you wrote, or start a new run directory"
    )
    try:
        body = json.loads(file.read_text(encoding="utf-8"))
        listed = body["files"] if body.get("format") == MANIFEST_FORMAT else None
    except FileNotFoundError:
        raise CheckpointError(
            f"{folder}: no {MANIFEST} (written by an older sla, or not by sla); {fix}. If you trust every "
            "file in it: python -c 'from sla_core.engine.checkpoint import write_manifest as w; "
            f'w("{folder}")\''
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{file}: unreadable manifest ({err!r}); {fix}") from err
    if not isinstance(listed, dict):
        raise CheckpointError(f"{file}: not an {MANIFEST_FORMAT}; {fix}")
    here = _files(folder)
    problems = [f"{n} is missing" for n in sorted(set(listed) - set(here))]
    problems += [f"{n} is not in the manifest" for n in sorted(set(here) - set(listed))]
    for name in sorted(set(here) & set(listed)):
        path = here[name]
        if path.is_symlink() or not path.is_file():
            problems.append(f"{name} is not a regular file")
        elif sha256_file(path) != listed[name]:
            problems.append(f"{name} does not match its sha256 (changed or truncated)")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{folder}: files differ from {MANIFEST}: {shown}; {fix}")


def commit(tmp: Path, root: Path, step: int, keep: int = KEEP) -> Path:
    """Rename the finished `tmp` to `root/step-N`, point `latest` at it, drop all but the newest `keep`."""
    final = root / step_name(step)
    if final.exists():
        shutil.rmtree(final)  # a stale copy of the same step (e.g. re-run after a crash); ours is newer
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, final.name + "\n")
    done = sorted(p for p in root.glob("step-*") if (p / META).is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_stale(root: Path) -> None:
    """Remove temp folders a killed write left behind (rank 0, before training)."""
    for tmp in root.glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def label_info(meta: dict[str, Any]) -> dict[str, Any]:
    """`{"tasks": {task: {"labels": [...], "max_length": n}}}` from a checkpoint's datasets, for the adapter
    set's description, so that `sla predict` on a bare set prints label names (empty if unknown)."""
    tasks = {
        t: {"labels": list(d["labels"]), "max_length": int(d["max_length"])}
        for t, d in (meta.get("datasets") or {}).items()
        if d.get("labels") and d.get("max_length")
    }
    return {"tasks": tasks} if tasks else {}


def save(
    engine: Any, model: Any, root: Path, step: int, meta: dict[str, Any], dist: ds.DistInfo, method: Method
) -> CheckpointRef:
    """Write the checkpoint of `step` atomically. Every rank calls it; rank 0 writes the shared files."""
    tmp = root / f".tmp-{step_name(step)}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ds.barrier()
    ds.save_engine(engine, tmp / ENGINE)
    with ds.gathered(trainable_params(model)):  # ZeRO-3: full tensors, never empty shards
        if dist.is_main:
            method.save(model, tmp / ADAPTERS, extra={"step": step, **label_info(meta)})
    if dist.is_main:
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, **meta}
        atomic_write_text(tmp / META, json.dumps(body, indent=2, sort_keys=True, default=str) + "\n")
    ds.barrier()  # every rank's engine shard is on disk
    if dist.is_main:
        write_manifest(tmp)
    final = commit(tmp, root, step) if dist.is_main else root / step_name(step)
    ds.barrier()
    return CheckpointRef(str(final), step)


def load(engine: Any, ref: CheckpointRef) -> dict[str, Any]:
    """Verify `ref` against its manifest, then restore its engine state and return its meta. Every rank
    calls it.

    Raises:
        CheckpointError: a file differs from the manifest (nothing is loaded then).
    """
    verify_manifest(ref.path)
    meta = read_meta(ref.path)
    try:
        ds.load_engine(engine, Path(ref.path) / ENGINE)
    except (ValueError, RuntimeError, KeyError) as err:  # torch's and DeepSpeed's shape/group mismatches
        raise CheckpointError(
            f"{ref.path}: its engine state does not fit this model ({type(err).__name__}: {err}); it was "
            "written by another structure or optimizer setup. Resume with the config that wrote it, or start "
            "a new run directory"
        ) from err
    return meta


RESUME_KEYS = ("batch_size", "grad_accum", "seed", "sampling", "sampling_temperature")


def check_resumable(
    meta: dict[str, Any],
    cfg: ExperimentConfig,
    fingerprints: dict[str, str],
    world_size: int,
    zero_stage: int,
    path: str,
    sla_resolved: dict[str, Any] | None = None,
) -> None:
    """Refuse to resume from a checkpoint of another structure, data, batch plan or process count.
    `sla_resolved`: the model's `SLAConfig` as a dict, which also catches a changed default (the budget
    recipe's) that the `sla:` section itself does not show."""
    saved = meta.get("experiment", {})
    problems = []
    before, now = meta.get("sla_resolved"), sla_resolved  # both JSON-ready (loop.sla_resolved)
    if before is not None and now is not None:
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            problems.append(
                "the structure's settings differ ("
                + ", ".join(f"{k} {before.get(k)!r} then vs {now.get(k)!r} now" for k in changed)
                + "; a default such as the budget recipe's may have changed)"
            )
    if saved.get("method", "sla") != cfg.method:
        problems.append(f"method {saved.get('method', 'sla')!r} vs {cfg.method!r}")
    if saved.get("sla") != cfg.model_dump(mode="json")["sla"]:
        problems.append("the `sla:` section differs")
    if saved.get("backbone") != cfg.backbone:
        problems.append(f"backbone {saved.get('backbone')!r} vs {cfg.backbone!r}")
    for key in RESUME_KEYS:
        before, now = saved.get("train", {}).get(key), getattr(cfg.train, key)
        if before != now:
            problems.append(f"train.{key} {before!r} vs {now!r}")
    if meta.get("fingerprints") != fingerprints:
        problems.append("the prepared datasets differ (fingerprints)")
    if meta.get("zero_stage") != zero_stage:
        problems.append(f"ZeRO stage {meta.get('zero_stage')} then vs {zero_stage} now")
    if meta.get("world_size") != world_size:
        problems.append(f"{meta.get('world_size')} process(es) then vs {world_size} now")
    if problems:
        raise CheckpointError(
            f"{path}: cannot resume: " + "; ".join(problems) + ". Resume with the same config and process "
            "count, or start a new run directory"
        )
