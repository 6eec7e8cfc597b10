"""Prompt sources: `job.prompt_file` read row by row, never whole, so a night of millions of rows starts at once.

A source is one of

  .txt (or any other name)   one prompt a line; blank lines and lines starting with `#` are skipped
  .jsonl / .ndjson           one JSON object a line (blank lines skipped)
  .csv                       a header line, then one row a line (the stdlib reader: quoted fields may hold commas)
  .parquet, or a folder      a Parquet file, or a Parquet dataset (every *.parquet under the folder, by name)

Each row holds a `prompt` and may set ROW_KEYS' others: `negative_prompt`, `seeds` (a list, a single integer, or in
CSV "1 2 3"), the overrides `width`, `height`, `steps`, `guidance`, `strategy`, and `regions` (region prompts as
`job.regions` takes them: a list of {box, prompt, negative_prompt, weight, feather} objects, in CSV or a string
column as JSON; they replace the job's).  Nothing else: a row that names
the model, a path or `trust_remote_code` (or any other key) is an error naming the row, since a prompt list is
data, often from elsewhere, and must not pick weights or run code.  An empty cell or a null is unset.

Errors are `ConfigError`s of `job.prompt_file` whose message names the line or row: the planner reads the source
once through (`count`) before anything is written, then again to render (`rows`).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Tuple

from . import xml_prompts
from .spec import ConfigError, JobConfig, RegionConfig, check_job_values, effective_prompt

ROW_KEYS = ("prompt", "negative_prompt", "seeds", "width", "height", "steps", "guidance", "strategy", "regions")
REGION_KEYS = tuple(f.name for f in dataclasses.fields(RegionConfig))
OVERRIDES = ROW_KEYS[1:]
_INTS = ("width", "height", "steps")
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
BATCH_ROWS = 8192  # Parquet rows read at a time


@dataclass(frozen=True)
class PromptRow:
    """One row of a source: where it is (for errors: "line 3", "part-0.parquet row 17"), its prompt, and the
    job fields it sets, as sorted (key, value) pairs."""

    where: str
    prompt: str
    overrides: Tuple[Tuple[str, object], ...] = ()

    def job(self, base: JobConfig, source: str) -> JobConfig:
        """`base` with this row's fields set, checked: a bad value is an error naming the row."""
        if not self.overrides:
            return base
        values = dict(self.overrides)
        if "seeds" in values:
            values["seeds"] = list(values["seeds"])
        if "regions" in values:
            values["regions"] = [RegionConfig(**dict(r)) for r in values["regions"]]
        j = dataclasses.replace(base, **values)
        try:
            check_job_values(j)
        except ConfigError as e:
            raise _bad(source, self.where, f"{e.field_name.split('.', 1)[1]}={e.value!r}: {e.why}") from None
        return j


def _bad(source: str, where: str, why: str) -> ConfigError:
    return ConfigError("job.prompt_file", source, f"{where}: {why}" if where else why)


def kind_of(path: str) -> str:
    """txt, jsonl, csv or parquet, from the name (a folder is a Parquet dataset)."""
    if os.path.isdir(path):
        return "parquet"
    suffix = os.path.splitext(path)[1].lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    return "csv" if suffix == ".csv" else "txt"


def rows(source: str) -> Iterator[PromptRow]:
    """The rows of `source`, in order, streamed; a bad row raises ConfigError naming it."""
    path = os.path.expanduser(source)
    if not os.path.exists(path):
        raise _bad(source, "", "no such file or folder")
    kind = kind_of(path)
    if kind == "parquet":
        yield from _parquet_rows(source, path)
        return
    if os.path.getsize(path) == 0:
        raise _bad(source, "", "the file is empty")
    with open(path, "rb") as raw:
        head = raw.read(8192)
    if b"\0" in head or head.startswith(b"PAR1"):
        raise _bad(source, "", f"a binary file, not {kind} text (a Parquet file must end in .parquet)")
    yield from {"txt": _text_rows, "jsonl": _jsonl_rows, "csv": _csv_rows}[kind](source, path)


def count(source: str, base: JobConfig) -> Tuple[int, int]:
    """(rows, images before duplicates: each row's seeds) of `source`, every row read and checked once (an XML
    prompt too: jobs.xml_prompts)."""
    n = images = 0
    for row in rows(source):
        n += 1
        j = row.job(base, source)
        try:
            xml_prompts.check(effective_prompt(j, row.prompt), "prompt")
        except ConfigError as e:
            raise _bad(source, row.where, str(e)) from None
        images += len(j.seeds)
    if not n:
        raise _bad(source, "", "holds no prompt (only blank lines or comments)")
    return n, images


def _lines(source: str, path: str) -> Iterator[Tuple[int, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        number = 0
        try:
            for number, line in enumerate(f, 1):
                if "\0" in line:
                    raise _bad(source, f"line {number}", "a NUL byte: a binary file, not text")
                yield number, line
        except UnicodeDecodeError as e:
            raise _bad(source, f"line {number + 1}", f"not UTF-8 text ({e.reason} at byte {e.start} of a "
                       "block): a binary file?") from None


def _text_rows(source: str, path: str) -> Iterator[PromptRow]:
    for number, line in _lines(source, path):
        text = line.strip()
        if text and not text.startswith("#"):
            yield PromptRow(f"line {number}", text)


def _jsonl_rows(source: str, path: str) -> Iterator[PromptRow]:
    for number, line in _lines(source, path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise _bad(source, f"line {number}", f"not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise _bad(source, f"line {number}", f"a JSON {type(obj).__name__}, not an object with a prompt")
        yield make_row(source, f"line {number}", obj)


def _csv_rows(source: str, path: str) -> Iterator[PromptRow]:
    reader = csv.DictReader(line for _, line in _lines(source, path))
    try:
        header = reader.fieldnames
        if not header:
            raise _bad(source, "", "the file is empty")
        header = [h.strip() for h in header]
        _check_columns(source, "the header", header)
        reader.fieldnames = header
        for obj in reader:
            where = f"line {reader.line_num}"
            if None in obj:
                raise _bad(source, where, f"{len(header) + len(obj[None])} fields, the header has {len(header)}")
            values = {k: v.strip() for k, v in obj.items() if v is not None and v.strip() != ""}
            if values:
                yield make_row(source, where, {k: _from_csv(source, where, k, v) for k, v in values.items()})
    except csv.Error as e:
        raise _bad(source, f"line {reader.line_num}", f"not CSV ({e})") from None


def _from_csv(source: str, where: str, key: str, value: str):
    """A CSV cell as the type its key takes."""
    value = value.strip()
    try:
        if key in _INTS:
            return int(value)
        if key == "guidance":
            return float(value)
        if key == "seeds":
            if value.startswith("["):
                return json.loads(value)
            return [int(s) for s in value.replace(",", " ").replace(";", " ").split()]
        if key == "regions":
            return json.loads(value)
    except json.JSONDecodeError:
        raise _bad(source, where, f"{key}={value!r}: not JSON") from None
    except ValueError:
        raise _bad(source, where, f"{key}={value!r}: not a number") from None
    return value


def _check_columns(source: str, where: str, names: List[str]) -> None:
    if "prompt" not in names:
        raise _bad(source, where, f"no prompt column (it has {', '.join(map(repr, names)) or 'none'})")
    unknown = [n for n in names if n not in ROW_KEYS]
    if unknown:
        raise _bad(source, where, f"unknown {'column' if len(unknown) == 1 else 'columns'} "
                   f"{', '.join(map(repr, unknown))}: a row may set only {', '.join(ROW_KEYS)} (never the model, "
                   "paths or trust_remote_code)")


def make_row(source: str, where: str, obj: dict) -> PromptRow:
    """A row from a mapping: a prompt, the other ROW_KEYS, nothing else; nulls are unset."""
    obj = {k: v for k, v in obj.items() if v is not None}
    unknown = sorted(set(obj) - set(ROW_KEYS))
    if unknown:
        raise _bad(source, where, f"unknown {'key' if len(unknown) == 1 else 'keys'} {', '.join(map(repr, unknown))}: "
                   f"a row may set only {', '.join(ROW_KEYS)} (never the model, paths or trust_remote_code)")
    prompt = obj.pop("prompt", None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise _bad(source, where, f"prompt={prompt!r}: each row needs a non-empty prompt string")
    if "seeds" in obj:
        seeds = obj["seeds"]
        seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
        if not isinstance(seeds, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                          for s in seeds):
            raise _bad(source, where, f"seeds={obj['seeds']!r}: a list of integers (or one)")
        obj["seeds"] = tuple(seeds)
    if "regions" in obj:
        obj["regions"] = _regions(source, where, obj["regions"])
    for key in _INTS:  # Parquet and JSON may give 1024.0; a fraction is refused by check_job_values
        if isinstance(obj.get(key), float) and obj[key].is_integer():
            obj[key] = int(obj[key])
    if isinstance(obj.get("guidance"), int) and not isinstance(obj["guidance"], bool):
        obj["guidance"] = float(obj["guidance"])
    return PromptRow(where, prompt.strip(), tuple(sorted(obj.items())))


def _regions(source: str, where: str, value) -> tuple:
    """A row's region prompts (a list of objects, or its JSON text) as hashable (key, value) pairs per region,
    nulls unset; their values are checked with the row's job (`validate_region`)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _bad(source, where, f"regions={value!r}: not JSON") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(r, dict) for r in value):
        raise _bad(source, where, f"regions={value!r}: a list of {{box, prompt, ...}} objects")
    out = []
    for k, r in enumerate(value):
        unknown = sorted(set(r) - set(REGION_KEYS))
        if unknown:
            raise _bad(source, where, f"regions[{k}]: unknown key {unknown[0]!r} (a region has "
                       f"{', '.join(REGION_KEYS)})")
        out.append(tuple((key, tuple(v) if isinstance(v, list) else v) for key, v in sorted(r.items())
                         if v is not None))
    return tuple(out)


def _parquet_files(source: str, path: str) -> List[str]:
    if not os.path.isdir(path):
        return [path]
    found = []
    for folder, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        found += [os.path.join(folder, n) for n in sorted(names)
                  if n.lower().endswith(PARQUET_SUFFIXES) and not n.startswith((".", "_"))]
    if not found:
        raise _bad(source, "", "the folder holds no .parquet file")
    return found


def _parquet_rows(source: str, path: str) -> Iterator[PromptRow]:
    import pyarrow.parquet as pq

    files = _parquet_files(source, path)
    total = 0
    for file in files:
        name = os.path.relpath(file, path) if file != path else ""
        try:
            pf = pq.ParquetFile(file)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
            raise _bad(source, name, f"unreadable Parquet file ({e})") from None
        _check_columns(source, name or "the schema", pf.schema_arrow.names)
        number = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            for obj in batch.to_pylist():
                number += 1
                yield make_row(source, f"{name + ' ' if name else ''}row {number}", obj)
        total += number
    if not total:
        raise _bad(source, "", "holds no rows")


def prompt_rows(job: JobConfig) -> Iterator[Tuple[str, JobConfig]]:
    """(prompt, the job for it) of every prompt: `job.prompts`, then the rows of `job.prompt_file`."""
    for p in job.prompts:
        yield p, job
    if job.prompt_file:
        for row in rows(job.prompt_file):
            yield row.prompt, row.job(job, job.prompt_file)
