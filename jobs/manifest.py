"""The Parquet manifest: one row per image under ``<output_dir>/manifest/`` (or, for a dated job, the Hive
partition ``manifest/date=YYYY-MM-DD/``: the folder is then one dataset with a ``date`` column for pyarrow,
DuckDB, Spark and pandas, the column in the folder name only, never in the files).

Every :meth:`Manifest.append` adds one immutable part file ``part-<time_ns>-<uuid8>.parquet``,
written to a hidden temp file and renamed into place, so a crash leaves the previous manifest or
the new one, never a torn file.  Readers take the parts in name order (= write order) and keep the
latest row of each image id, so a re-render replaces its old row.  Hidden (``.``) and ``_`` files
are ignored, here and by ``pyarrow.dataset``.  One writer per output folder at a time: the driver, under
`jobs.lock.OutputLock`.

A part that cannot be read (torn by a copy, a full disk, a bad sector) is skipped with a warning naming it, and
the writer (`repair`) moves it aside to ``_torn/``: its images are found again from their files
(`recover`, which reads the id embedded in the picture) or rendered again; a folder never gets stuck.

Resume (`done`) costs one ``stat`` an image: a row is done when its file has the recorded size and
modification time (``mtime_ns``); ``verify`` hashes every file instead.  Rows of older writers without
``mtime_ns`` are hashed once and rewritten with it.

Old parts that lack a column added to :data:`SCHEMA` later read with that column null.
"""
from __future__ import annotations

import time
import uuid
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from .images import atomic_write, read_parameters, sha256_file

log = logging.getLogger("tessera")

_TS = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("job", pa.string()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("seed", pa.int64()),
    ("model", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("steps", pa.int32()),
    ("guidance", pa.float64()),
    ("scheduler", pa.string()),
    ("tiling_method", pa.string()),
    ("tile", pa.int32()),
    ("overlap", pa.int32()),
    ("status", pa.string()),  # "ok" or "failed"
    ("error", pa.string()),  # why a failed image failed
    ("path", pa.string()),  # relative to the output folder
    ("sha256", pa.string()),
    ("bytes", pa.int64()),
    ("started_at", _TS),
    ("finished_at", _TS),
    ("seconds_denoise", pa.float64()),
    ("seconds_decode", pa.float64()),
    ("worker", pa.string()),
    ("wrap", pa.string()),  # none, x, y or both: the image tiles seamlessly on those axes
    ("seam_score", pa.float64()),  # across the denoise tiles' borders; 1.0: invisible (tiling.seams)
    ("seam_score_vae", pa.float64()),  # across the VAE decode tiles' borders
    ("strategy", pa.string()),  # progressive (a base, then enlarged stages) or direct
    ("strength", pa.float64()),  # the share of each enlarged stage's schedule that runs
    ("stages", pa.string()),  # the denoised sizes, smallest first, e.g. 344x192>688x384>1920x1080
    ("init_image", pa.string()),  # the picture an img2img render starts from, as given
    ("init_sha256", pa.string()),
    ("mtime_ns", pa.int64()),  # the file's modification time when written: resume compares it and the size
    ("warnings", pa.string()),  # what the image's render should tell (a truncated prompt, a retry), "; "-joined
    ("regions", pa.string()),  # JSON: the region prompts [{box, prompt, negative_prompt, weight, feather}], or null
    ("deep_cache", pa.int64()),  # model.deep_cache: the whole denoiser every N-th step (0, 1: every step)
])
TORN = "_torn"  # where unreadable parts are moved (ignored by pyarrow.dataset, as every _ name)
STATUSES = ("ok", "failed")
_last_ns = 0


def _part_name() -> str:
    global _last_ns
    _last_ns = max(time.time_ns(), _last_ns + 1)  # strictly increasing within this process
    return f"part-{_last_ns:020d}-{uuid.uuid4().hex[:8]}.parquet"


def _conform(table: pa.Table) -> pa.Table:
    """``table`` with SCHEMA's columns in order (missing ones null), then any extra columns."""
    cols = [table[f.name].cast(f.type) if f.name in table.column_names
            else pa.nulls(len(table), f.type) for f in SCHEMA]
    extra = [n for n in table.column_names if n not in SCHEMA.names]
    cols += [table[n] for n in extra]
    fields = list(SCHEMA) + [table.schema.field(n) for n in extra]
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


class Manifest:
    """The manifest of one output folder, or of one partition of it (``partition="date=2026-12-01"``)."""

    def __init__(self, output_dir, partition: Optional[str] = None):
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "manifest"
        self.dir = self.root / partition if partition else self.root
        self.partition = partition
        self.unreadable: List[Path] = []  # parts the last read skipped
        self.mine: List[Path] = []  # parts this object wrote since its last compaction
        self.changed: set = set()  # ids `done` found with an ok row but a file that differs from it

    def parts(self) -> list[Path]:
        """Visible part files, in name (= write) order."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("part-*.parquet") if p.is_file())

    def _write(self, table: pa.Table) -> Path:
        path = self.dir / _part_name()
        atomic_write(path, lambda f: pq.write_table(table, f))
        return path

    def append(self, rows: list[dict]) -> Path | None:
        """Write ``rows`` as one new part; missing columns are null, unknown keys an error."""
        if not rows:
            return None
        for row in rows:
            unknown = set(row) - set(SCHEMA.names)
            if unknown:
                raise ValueError(f"manifest row {row.get('image_id')!r}: unknown columns "
                                 f"{sorted(unknown)}; add them to jobs.manifest.SCHEMA")
            if not row.get("image_id"):
                raise ValueError(f"manifest row has no image_id: {row!r}")
            if row.get("status") not in STATUSES:
                raise ValueError(f"manifest row {row['image_id']!r}: "
                                 f"status={row.get('status')!r}: must be ok or failed")
        path = self._write(pa.Table.from_pylist(rows, schema=SCHEMA))
        self.mine.append(path)
        return path

    def _read(self, parts: List[Path], columns: Optional[List[str]] = None) -> pa.Table:
        """The parts' rows, in order; an unreadable part is skipped with a warning (and listed in `unreadable`)."""
        tables = []
        self.unreadable = []
        for p in parts:
            try:
                t = pq.read_table(p)
            except FileNotFoundError:  # compacted away by the writer meanwhile
                continue
            except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds on a torn file
                self.unreadable.append(p)
                log.warning("manifest part %s is unreadable (%s): skipped", p, e)
                continue
            t = _conform(t)
            tables.append(t.select(columns) if columns else t)
        if not tables:
            return SCHEMA.empty_table().select(columns) if columns else SCHEMA.empty_table()
        return pa.concat_tables(tables, promote_options="default")

    def _read_all(self, columns: Optional[List[str]] = None) -> tuple[list[Path], pa.Table]:
        parts = self.parts()
        return parts, self._read(parts, columns)

    @staticmethod
    def _latest(table: pa.Table) -> pa.Table:
        last = {iid: i for i, iid in enumerate(table["image_id"].to_pylist())}
        return table.take(pa.array(sorted(last.values()), pa.int64()))

    def table(self) -> pa.Table:
        """One row per image id, the latest written, in write order."""
        return self._latest(self._read_all()[1])

    def rows(self) -> list[dict]:
        return self.table().to_pylist()

    def repair(self) -> List[Path]:
        """The writer's check at start: every unreadable part moved aside to ``_torn/`` with a warning naming it;
        returns where they went. Their images are found again by `recover` or rendered again."""
        self._read_all(["image_id"])
        moved = []
        for p in self.unreadable:
            dest = self.dir / TORN / p.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, dest)
            log.warning("manifest part %s was unreadable: moved aside to %s; its images are found again from "
                        "their files or rendered again", p, dest)
            moved.append(dest)
        self.unreadable = []
        return moved

    def compact(self) -> Path | None:
        """Rewrite all parts as one, then remove the merged parts (a crash between is harmless). Unreadable
        parts are left where they are (`repair` moves them)."""
        parts, table = self._read_all()
        readable = [p for p in parts if p not in self.unreadable]
        self.mine = []
        if len(readable) <= 1:
            return readable[0] if readable else None
        new = self._write(self._latest(table))
        for p in readable:
            p.unlink(missing_ok=True)
        return new

    def compact_mine(self) -> Path | None:
        """Merge the parts this object wrote since its last compaction into one (the writer, every few hundred
        rows: the part count stays small and the cost does not grow with the manifest)."""
        mine, self.mine = self.mine, []
        if len(mine) <= 1:
            self.mine = mine
            return mine[0] if mine else None
        new = self._write(self._read(mine))
        for p in mine:
            p.unlink(missing_ok=True)
        self.mine = [new]
        return new

    def done(self, verify: bool = False) -> Dict[str, str]:
        """Image id -> path of every image whose latest row is ok and whose file is there as recorded: the same
        size and modification time (one ``stat``), or with ``verify`` the same sha256. A row without a time
        (an older writer's) is hashed once, and a row with the time is appended for it. Ids whose ok row's file
        is there but differs go to `changed` (rendered again, never `recover`ed: someone changed the file)."""
        cols = ["image_id", "status", "path", "sha256", "bytes", "mtime_ns"]
        table = self._latest(self._read_all(cols)[1])
        done, upgraded, self.changed = {}, [], set()
        for iid, status, rel, sha, size, mtime in zip(*(table[c].to_pylist() for c in cols)):
            if status != "ok" or not rel or not sha:
                continue
            path = self.output_dir / rel
            try:
                st = path.stat()
            except OSError:
                continue
            if size is not None and st.st_size != size:
                self.changed.add(iid)
            elif mtime is not None and not verify:
                if st.st_mtime_ns == mtime:
                    done[iid] = rel
                else:
                    self.changed.add(iid)
            elif sha256_file(path) == sha:
                done[iid] = rel
                if mtime is None:
                    upgraded.append(iid)
            else:
                self.changed.add(iid)
        if upgraded:
            keep = set(upgraded)
            full = self.table()
            rows = [dict(r, mtime_ns=(self.output_dir / r["path"]).stat().st_mtime_ns)
                    for r in full.to_pylist() if r["image_id"] in keep]
            self.append(rows)
        return done

    def done_ids(self, verify: bool = False) -> set[str]:
        """Ids of `done` images."""
        return set(self.done(verify))


def recover(req, output_dir) -> Optional[dict]:
    """A manifest row for `req`'s image file when it is on disk without one (its row was lost: a torn part, a
    driver killed between the write and the row): the file must carry `req`'s id in its embedded parameters
    (files are written whole, by rename, so one that is there is complete). None when there is no such file."""
    path = Path(output_dir) / req.path
    try:
        st = path.stat()
        params = read_parameters(path)
    except Exception:  # noqa: BLE001 - missing, or not a picture: render it again
        return None
    if not params or not params.rstrip().endswith(f"Tessera image id: {req.image_id}"):
        return None
    stages = next((f.split(": ", 1)[1] for f in params.splitlines()[-1].split(", ") if f.startswith("Stages: ")),
                  f"{req.width}x{req.height}")
    return req.manifest_row(status="ok", error=None, sha256=sha256_file(path), bytes=st.st_size,
                            mtime_ns=st.st_mtime_ns, stages=stages, worker="recovered",
                            warnings="recovered from its file: the row written with it was lost")
