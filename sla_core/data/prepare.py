"""Preparation: source -> validated rows -> seeded splits -> noise -> tokens -> cached Arrow files.

`prepare_task` is the one entry point; the same inputs give the same fingerprint and a cache hit, and a
cold rebuild writes byte-identical files. `noisy_eval_ref` derives noisy copies of an evaluation split
from a prepared clean set, cached the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from sla_core.data.builtin import builtin_files, load_builtin
from sla_core.data.errors import ConfigError, DataError, DataSourceError
from sla_core.data.noise import flip_labels, noise_texts
from sla_core.data.raw import RawSplit, group_split, text_key
from sla_core.data.readers import check_data_file, file_format, read_hub, read_local, source_digest
from sla_core.data.ref import (
    FORMAT_VERSION,
    DatasetRef,
    atomic_dir,
    entry_dir,
    pad_id,
    read_arrow,
    read_cached,
    stable_hash,
    tokenizer_fingerprint,
    write_arrow,
    write_json,
)
from sla_core.data.spec import SPLITS, NoiseSpec, TaskSpec
from sla_core.data.validate import ValidationReport, infer_labels, validate_splits

TOKENIZE_CHUNK = 1000


def source_fingerprint(spec: TaskSpec) -> dict[str, Any]:
    """What identifies the source: file contents (builtin, local) or name, config, splits, revision (hub)."""
    if spec.source == "builtin":
        files = builtin_files(spec.builtin_name or spec.name)
        return {"builtin": spec.builtin_name, "sha": stable_hash([source_digest(f) for f in files])}
    if spec.source == "hub":
        assert spec.hub is not None
        return {"hub": spec.hub.model_dump(mode="json")}
    assert spec.files is not None
    out: dict[str, Any] = {"encoding": spec.files.encoding}
    if spec.files.columns is not None:  # set only when given, so other fingerprints stay as they were
        out["columns"] = list(spec.files.columns)
    for split in SPLITS:
        path = getattr(spec.files, split)
        if path is not None:
            check_data_file(Path(path), spec.name)
            out[split] = {"format": file_format(Path(path)), "sha": source_digest(Path(path))}
    return out


def task_fingerprint(spec: TaskSpec, tokenizer: Any, eval_noise: NoiseSpec | None = None) -> str:
    """sha256 over format version, spec (minus file paths), source, tokenizer and evaluation noise.

    `tokenizer` may be the tokenizer or its `tokenizer_fingerprint`.
    """
    return stable_hash(
        {
            "version": FORMAT_VERSION,
            "spec": spec.model_dump(mode="json", exclude={"eval_noise_levels", "eval_noise_kinds", "files"}),
            "source": source_fingerprint(spec),
            "tokenizer": tokenizer if isinstance(tokenizer, str) else tokenizer_fingerprint(tokenizer),
            "eval_noise": None if eval_noise is None or eval_noise.is_zero else eval_noise.model_dump(),
        }
    )


def _load_raw(spec: TaskSpec, progress: bool) -> tuple[dict[str, RawSplit], list[str], dict[str, int]]:
    """Raw splits, the label set and dedupe statistics (builtins only)."""
    if spec.source == "builtin":
        raw, stats = load_builtin(spec.builtin_name or spec.name, progress)
        return {"train": raw}, list(spec.declared_labels or []), stats
    if spec.source == "hub":
        splits, names = read_hub(spec)
        labels = spec.labels or names
    else:
        splits, labels = read_local(spec), spec.labels
    return splits, list(labels or infer_labels(splits["train"].label)), {}


def _carve(kept: dict[str, RawSplit], ids: dict[str, np.ndarray], spec: TaskSpec) -> None:
    """Carve missing validation/test splits out of train, whole groups at a time (in place)."""
    missing = [s for s in ("validation", "test") if s not in kept]
    if not missing:
        return
    fr = dict(zip(SPLITS, spec.split_fractions, strict=True))
    fractions = [1.0 - sum(fr[s] for s in missing)] + [fr[s] for s in missing]
    train = kept["train"]
    groups = train.group or [
        text_key(t, p) for t, p in zip(train.text, train.text_pair or [None] * len(train), strict=True)
    ]
    parts = group_split(groups, fractions, spec.split_seed)
    train_ids = ids["train"]
    for split, idx in zip(["train", *missing], parts, strict=True):
        kept[split], ids[split] = train.take(idx), train_ids[idx]
    empty = [s for s in SPLITS if len(kept[s]) == 0]
    if empty:
        raise DataSourceError(
            f"task {spec.name!r}: split(s) {empty} are empty after splitting {len(train)} rows; "
            "fix: add rows, or give the splits as files"
        )


def _subsample(kept: dict[str, RawSplit], ids: dict[str, np.ndarray], spec: TaskSpec) -> None:
    """Seeded subsets for max_train_examples / max_eval_examples, keeping source order (in place)."""
    for split in SPLITS:
        limit = spec.max_train_examples if split == "train" else spec.max_eval_examples
        if limit is None or len(kept[split]) <= limit:
            continue
        rng = np.random.default_rng([spec.split_seed, SPLITS.index(split), 31])
        idx = np.sort(rng.choice(len(kept[split]), size=limit, replace=False))
        kept[split], ids[split] = kept[split].take(idx), ids[split][idx]


def tokenize(
    tokenizer: Any,
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    max_length: int,
    progress: bool = False,
    desc: str = "tokenize",
) -> pa.ListArray:
    """Token ids (truncated to max_length, not padded) as an Arrow list<int32> column."""
    offsets = [0]
    values: list[np.ndarray] = []
    for start in tqdm(range(0, len(texts), TOKENIZE_CHUNK), desc=desc, disable=not progress, leave=False):
        stop = start + TOKENIZE_CHUNK
        enc = tokenizer(
            list(texts[start:stop]),
            list(pairs[start:stop]) if pairs is not None else None,
            truncation=True,
            max_length=max_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        for ids in enc["input_ids"]:
            values.append(np.asarray(ids, dtype=np.int32))
            offsets.append(offsets[-1] + len(ids))
    flat = np.concatenate(values) if values else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int32()))


def _split_table(
    raw: RawSplit,
    labels: np.ndarray,
    noise: NoiseSpec,
    n_labels: int,
    purpose: str,
    tokenizer: Any,
    max_length: int,
    progress: bool,
    clean_labels: np.ndarray | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Apply `noise` to one split (label noise only for purpose "train") and tokenize it.

    Returns:
        (the Arrow table, {"requested", "measured", "counts"} of the noise).
    """
    texts, counts = noise_texts(raw.text, noise.char, noise.word, noise.seed, f"{purpose}/text", progress)
    pairs = None
    if raw.text_pair is not None:
        pairs, pair_counts = noise_texts(
            raw.text_pair, noise.char, noise.word, noise.seed, f"{purpose}/pair", progress
        )
        counts = counts + pair_counts
    counts.rows = len(raw)
    noisy = labels
    if purpose == "train" and noise.label > 0:
        noisy, counts.label_flips = flip_labels(labels, n_labels, noise.label, noise.seed)
    ids = tokenize(tokenizer, texts, pairs, max_length, progress, f"{purpose} tokenize")
    cols: dict[str, pa.Array] = {
        "input_ids": ids,
        "attention_mask": pa.ListArray.from_arrays(
            ids.offsets, pa.array(np.ones(len(ids.values), dtype=np.int8))
        ),
        "labels": pa.array(noisy, pa.int64()),
        "clean_labels": pa.array(labels if clean_labels is None else clean_labels, pa.int64()),
        "text": pa.array(texts, pa.string()),
    }
    if pairs is not None:
        cols["text_pair"] = pa.array(pairs, pa.string())
    cols["source"] = pa.array(raw.source, pa.string()).dictionary_encode()
    cols["line"] = pa.array(raw.line, pa.int64())
    info = {"requested": noise.model_dump(), "measured": counts.measured(), "counts": vars(counts)}
    return pa.table(cols), info


def prepare_task(
    spec: TaskSpec,
    tokenizer: Any,
    cache_dir: Path,
    *,
    eval_noise: NoiseSpec | None = None,
    progress: bool = True,
) -> DatasetRef:
    """Prepare one task: validate, split, add noise, tokenize and cache it.

    Args:
        spec: the task. tokenizer: the backbone's HF tokenizer. cache_dir: root of the dataset cache.
        eval_noise: character/word noise for validation and test (label noise is for training only).
        progress: show tqdm bars for long steps.
    Returns:
        the `DatasetRef`; a cache hit returns at once without reading the source rows.
    Raises:
        DataValidationError, DataSourceError, ConfigError. On any error nothing is written.
    """
    if eval_noise is not None and eval_noise.label > 0:
        raise ConfigError(
            f"task {spec.name!r}: eval_noise.label must be 0; label noise is for training data only"
        )
    cache_dir = Path(cache_dir)
    tok_fp = tokenizer_fingerprint(tokenizer)
    fingerprint = task_fingerprint(spec, tok_fp, eval_noise)
    folder = entry_dir(cache_dir, spec.name, fingerprint)
    cached = read_cached(folder, fingerprint)
    if cached is not None:
        return cached
    splits, labels, dedupe_stats = _load_raw(spec, progress)
    kept, ids, report = validate_splits(splits, spec, labels, dedupe_stats)
    _carve(kept, ids, spec)
    _subsample(kept, ids, spec)
    tables, noise_info = {}, {}
    for split in SPLITS:
        noise = spec.train_noise if split == "train" else (eval_noise or NoiseSpec())
        tables[split], noise_info[split] = _split_table(
            kept[split], ids[split], noise, len(labels), split, tokenizer, spec.max_length, progress
        )
    ref = DatasetRef(
        task=spec.name,
        path=str(folder.resolve()),
        fingerprint=fingerprint,
        labels=labels,
        counts={s: t.num_rows for s, t in tables.items()},
        noise=noise_info,
        skipped={k: n for k, n in report.counts.items() if n},
        pad_token_id=pad_id(tokenizer),
        tokenizer=tok_fp,
        max_length=spec.max_length,
        text_pair=spec.text_pair_column is not None,
    )
    _write_entry(folder, tables, ref, report, spec)
    return read_cached(folder, fingerprint) or ref


def _write_entry(
    folder: Path,
    tables: dict[str, pa.Table],
    ref: DatasetRef,
    report: ValidationReport | None,
    spec: TaskSpec | None,
) -> None:
    if folder.exists() and read_cached(folder, ref.fingerprint) is None:
        import shutil

        shutil.rmtree(folder)  # an incomplete or foreign entry under our name; ours replaces it
    with atomic_dir(folder) as tmp:
        for split, table in tables.items():
            write_arrow(table, tmp / f"{split}.arrow")
        write_json(
            tmp / "report.json",
            {
                "validation": report.to_dict() if report else None,
                "spec": spec.model_dump(mode="json") if spec else None,
            },
        )
        (tmp / "ref.json").write_text(ref.to_json() + "\n", encoding="utf-8")


def prepare_tasks(
    specs: Sequence[TaskSpec], tokenizer: Any, cache_dir: Path, *, progress: bool = True
) -> dict[str, DatasetRef]:
    """Prepare several tasks with one tokenizer; task names must be unique."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique, got {names}")
    return {s.name: prepare_task(s, tokenizer, cache_dir, progress=progress) for s in specs}


def noisy_eval_ref(
    ref: DatasetRef,
    split: str,
    level: float,
    tokenizer: Any,
    seed: int = 0,
    *,
    progress: bool = False,
    kind: str = "char+word",
) -> DatasetRef:
    """A cached copy of one split of a clean prepared set with noise at `level`: char and word operations
    (`kind="char+word"`), or one of them only (`"word"`, `"char"`).

    Returns:
        a `DatasetRef` holding only `split`; its `noise[split]` has the requested and measured ratios.
    """
    if not 0.0 <= level <= 1.0:
        raise ConfigError(f"noise level must lie in [0, 1], got {level}")
    if tokenizer_fingerprint(tokenizer) != ref.tokenizer:
        raise DataError(
            f"task {ref.task!r}: the tokenizer differs from the one the data was prepared with; "
            "fix: pass the same backbone's tokenizer"
        )
    noise = NoiseSpec.of_kind(kind, level, seed)
    fingerprint = stable_hash(
        {"version": FORMAT_VERSION, "base": ref.fingerprint, "split": split, "noise": noise.model_dump()}
    )
    name = f"noise{level:g}" if kind == "char+word" else f"{kind}{level:g}"
    folder = entry_dir(Path(ref.path).parent, f"{ref.task}.{split}.{name}", fingerprint)
    cached = read_cached(folder, fingerprint)
    if cached is not None:
        return cached
    clean = read_arrow(ref.split_path(split))
    raw = RawSplit(
        text=clean.column("text").to_pylist(),
        label=[None] * clean.num_rows,
        line=clean.column("line").to_pylist(),
        source=[str(s) for s in clean.column("source").to_pylist()],
        text_pair=clean.column("text_pair").to_pylist() if ref.text_pair else None,
    )
    table, info = _split_table(
        raw,
        clean.column("labels").to_numpy(),
        noise,
        ref.num_labels,
        f"eval-{split}",
        tokenizer,
        ref.max_length,
        progress,
        clean_labels=clean.column("clean_labels").to_numpy(),
    )
    out = dataclasses.replace(
        ref,
        path=str(folder.resolve()),
        fingerprint=fingerprint,
        counts={split: table.num_rows},
        noise={split: info},
        skipped={},
    )
    _write_entry(folder, {split: table}, out, None, None)
    return read_cached(folder, fingerprint) or out


def noisy_eval_split(ref: DatasetRef, split: str, level: float, tokenizer: Any, seed: int = 0) -> Any:
    """The noisy copy of `split` at `level` as a `datasets.Dataset` (see `noisy_eval_ref` for the ratios)."""
    return noisy_eval_ref(ref, split, level, tokenizer, seed).load(split)


def prepare_eval_levels(
    ref: DatasetRef, tokenizer: Any, levels: Sequence[float], split: str = "test", seed: int = 0
) -> dict[float, DatasetRef]:
    """Noisy copies of one evaluation split at several levels, all from one clean prepared set."""
    return {float(level): noisy_eval_ref(ref, split, float(level), tokenizer, seed) for level in levels}
