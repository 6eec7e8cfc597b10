"""The Parquet manifest: one row per image under ``<output_dir>/manifest/``.

Every :meth:`Manifest.append` adds one immutable part file ``part-<time_ns>-<uuid8>.parquet``,
written to a hidden temp file and renamed into place, so a crash leaves the previous manifest or
the new one, never a torn file.  Readers take the parts in name order (= write order) and keep the
latest row of each image id, so a re-render replaces its old row.  Hidden (``.``) and ``_`` files
are ignored, here and by ``pyarrow.dataset``.  One writer per output folder at a time (the driver).

Old parts that lack a column added to :data:`SCHEMA` later read with that column null.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .images import atomic_write, sha256_file

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
    ("regions", pa.string()),  # JSON: the region prompts [{box, prompt, negative_prompt, weight, feather}], or null
])
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
    """The manifest of one output folder."""

    def __init__(self, output_dir):
        self.output_dir = Path(output_dir)
        self.dir = self.output_dir / "manifest"

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
        return self._write(pa.Table.from_pylist(rows, schema=SCHEMA))

    def _read_all(self) -> tuple[list[Path], pa.Table]:
        parts = self.parts()
        if not parts:
            return parts, SCHEMA.empty_table()
        tables = [_conform(pq.read_table(p)) for p in parts]
        return parts, pa.concat_tables(tables, promote_options="default")

    @staticmethod
    def _latest(table: pa.Table) -> pa.Table:
        last = {iid: i for i, iid in enumerate(table["image_id"].to_pylist())}
        return table.take(pa.array(sorted(last.values()), pa.int64()))

    def table(self) -> pa.Table:
        """One row per image id, the latest written, in write order."""
        return self._latest(self._read_all()[1])

    def rows(self) -> list[dict]:
        return self.table().to_pylist()

    def compact(self) -> Path | None:
        """Rewrite all parts as one, then remove the merged parts (a crash between is harmless)."""
        parts, table = self._read_all()
        if len(parts) <= 1:
            return parts[0] if parts else None
        new = self._write(self._latest(table))
        for p in parts:
            p.unlink()
        return new

    def done_ids(self) -> set[str]:
        """Ids whose latest row is ok and whose file exists with the recorded size and sha256."""
        done = set()
        for row in self.rows():
            if row["status"] != "ok" or not row["path"] or not row["sha256"]:
                continue
            path = self.output_dir / row["path"]
            if not path.is_file():
                continue
            if row["bytes"] is not None and path.stat().st_size != row["bytes"]:
                continue
            if sha256_file(path) == row["sha256"]:
                done.add(row["image_id"])
        return done
