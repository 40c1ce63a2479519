"""Dataset files as numbered rows, for every task's loader: JSON Lines or Parquet, local or on the Hub.

A path is a local file or ``hf://datasets/<owner>/<name>/<file in the repo>`` (optionally
``@<revision>`` after the name), fetched once into the Hugging Face cache. Errors name the file, the
1-based row (the line number for JSON Lines, as an editor shows it), the field and the fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
_HUB = re.compile(r"^hf://datasets/(?P<repo>[\w.-]+/[\w.-]+?)(?:@(?P<rev>[\w.-]+))?/(?P<file>.+)$")


class DatasetError(ValueError):
    """A dataset file or one of its rows is malformed; the message names file, row, field and fix."""


def short(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters, so a hostile row cannot flood the error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def resolve_data_path(path: str | Path) -> Path:
    """A local path as is; an ``hf://datasets/...`` path downloaded (once) through ``huggingface_hub``."""
    text = str(path)
    if not text.startswith("hf://"):
        return Path(text)
    match = _HUB.match(text)
    if match is None:
        raise DatasetError(
            f"{text}: a Hub dataset path is hf://datasets/<owner>/<name>[@<revision>]/<file>, "
            "e.g. hf://datasets/Jiayi-Pan/Countdown-Tasks-3to4/data/train-00000-of-00001.parquet"
        )
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(match["repo"], match["file"], repo_type="dataset", revision=match["rev"] or None)
    )


def matching(where: Mapping[str, Any] | None) -> str:
    """`` matching {...}`` for an empty-file error when a row filter was applied, else ``""``."""
    return f" matching data.row_filter {dict(where)}" if where else ""


def read_rows(
    path: Path,
    required: Sequence[str],
    optional: Sequence[str] = (),
    example: str = "{}",
    where: Mapping[str, Any] | None = None,
) -> Iterator[tuple[int, Any]]:
    """(row number, row) pairs of a JSON Lines or Parquet file. Parquet reads only ``required`` and
    ``optional`` columns (and those of ``where``) and refuses a file without a required one; ``example`` is
    a valid JSON row, quoted in the error for a malformed line. With ``where``, only the rows whose fields
    equal those values (e.g. ``{"ability": "coding"}``: the code split of a mixed file); the row numbers
    stay the file's, so an error still points at the right line."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = _jsonl_rows(path, example)
    elif suffix in PARQUET_SUFFIXES:
        rows = _parquet_rows(path, (*required, *(where or {})), optional)
    else:
        raise DatasetError(
            f"{path}: unknown dataset format {suffix!r}; use one of {list(JSONL_SUFFIXES + PARQUET_SUFFIXES)}"
        )
    if not where:
        return rows
    return (
        (n, row)
        for n, row in rows
        if isinstance(row, dict) and all(row.get(k) == v for k, v in where.items())
    )


def _jsonl_rows(path: Path, example: str) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{path}: row {lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
                    f"each line must be one JSON object such as {example}"
                ) from None


def _parquet_rows(path: Path, required: Sequence[str], optional: Sequence[str]) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq  # optional: only Parquet datasets need it
    except ImportError as exc:
        raise ImportError(
            f"reading {path} needs pyarrow, which is not installed; run `pip install pyarrow` "
            f"or convert the file to JSON Lines"
        ) from exc
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    for field in required:
        if field not in names:
            raise DatasetError(f"{path}: row 1: field {field!r} is missing (columns: {names}); add it")
    columns = [c for c in (*required, *optional) if c in names]
    rownum = 0
    for batch in parquet.iter_batches(columns=columns):
        for row in batch.to_pylist():
            rownum += 1
            yield rownum, row
