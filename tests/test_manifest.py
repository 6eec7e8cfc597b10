import os
import pathlib
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

import jobs.images
import jobs.manifest
from jobs import SCHEMA, Manifest, TesseraConfig, plan, write_image

T0 = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=timezone.utc)
T1 = datetime(2025, 3, 4, 5, 7, 8, 654321, tzinfo=timezone.utc)


def row(iid, status="ok", **kw):
    r = {"image_id": iid, "job": "night", "prompt": f"prompt {iid}", "negative_prompt": "",
         "seed": 2**40 + 1, "model": "demo", "width": 3840, "height": 2160, "steps": 20,
         "guidance": 7.5, "scheduler": "euler", "tiling_method": "gaussian", "tile": 64,
         "overlap": 16, "status": status, "error": None if status == "ok" else "CUDA OOM",
         "path": f"images/night/{iid}.png", "sha256": "0" * 64, "bytes": 1234,
         "started_at": T0, "finished_at": T1, "seconds_denoise": 12.25, "seconds_decode": 1.5,
         "worker": "node1/gpu0", "wrap": "none", "seam_score": 1.01, "seam_score_vae": 1.0,
         "strategy": "progressive", "strength": 0.5, "stages": "1368x768>2288x1288>3840x2160", "init_image": None,
         "init_sha256": None, "mtime_ns": None, "warnings": None, "regions": None, "deep_cache": 0}
    r.update(kw)
    return r



def test_empty(tmp_path):
    m = Manifest(tmp_path)
    assert m.rows() == [] and m.done_ids() == set() and m.compact() is None
    assert m.table().schema == SCHEMA and m.table().num_rows == 0
    assert m.append([]) is None and not (tmp_path / "manifest").exists()


def test_round_trip_exact_values(tmp_path):
    m = Manifest(tmp_path)
    rows = [row("a"), row("b", status="failed", sha256=None, bytes=None, path=None)]
    part = m.append(rows)
    assert part.parent == tmp_path / "manifest" and part.name.startswith("part-")
    assert m.rows() == rows
    t = m.table()
    assert t.schema == SCHEMA
    assert t["started_at"].to_pylist()[0] == T0 and t["seed"].to_pylist()[0] == 2**40 + 1
    assert pq.read_table(part).schema == SCHEMA


def test_missing_keys_are_null_and_bad_rows_raise(tmp_path):
    m = Manifest(tmp_path)
    m.append([{"image_id": "x", "status": "failed", "error": "boom"}])
    (r,) = m.rows()
    assert r["error"] == "boom" and r["seed"] is None and r["worker"] is None
    with pytest.raises(ValueError, match="aesthetic_score"):
        m.append([row("y", aesthetic_score=0.1)])
    with pytest.raises(ValueError, match="status='done'"):
        m.append([row("y", status="done")])
    with pytest.raises(ValueError, match="no image_id"):
        m.append([row(None)])
    assert [r["image_id"] for r in m.rows()] == ["x"] and len(m.parts()) == 1


def test_rows_from_requests(tmp_path):
    cfg = TesseraConfig()
    cfg.job.seeds = [1, 2]
    reqs = plan(cfg)
    m = Manifest(tmp_path)
    m.append([r.manifest_row(status="ok", started_at=T0) for r in reqs])
    got = m.rows()
    assert [g["image_id"] for g in got] == [r.image_id for r in reqs]
    assert got[1]["seed"] == 2 and got[1]["path"] == reqs[1].path and got[1]["width"] == 3840


def test_rerender_replaces_row(tmp_path):
    m = Manifest(tmp_path)
    m.append([row("a", status="failed"), row("b")])
    m.append([row("c")])
    m.append([row("a", worker="node2/gpu1")])
    got = m.rows()
    assert [(r["image_id"], r["status"]) for r in got] == [("b", "ok"), ("c", "ok"), ("a", "ok")]
    assert got[2] == row("a", worker="node2/gpu1")
    assert len(m.parts()) == 3


def test_latest_wins_within_one_part(tmp_path):
    m = Manifest(tmp_path)
    m.append([row("a", status="failed"), row("a", seed=5)])
    assert m.rows() == [row("a", seed=5)]


def test_parts_sort_in_write_order(tmp_path):
    m = Manifest(tmp_path)
    paths = [m.append([row("a", seed=i)]) for i in range(20)]
    assert m.parts() == paths
    assert m.rows()[0]["seed"] == 19


def _ok_image(tmp_path, m, iid, seed):
    px = np.full((8, 8, 3), seed, np.uint8)
    rel = f"images/night/{iid}.png"
    sha, n = write_image(px, tmp_path, rel, "png", 95, iid)
    return row(iid, path=rel, sha256=sha, bytes=n)


def test_done_ids(tmp_path):
    m = Manifest(tmp_path)
    rows = [_ok_image(tmp_path, m, iid, i) for i, iid in enumerate("abcdef")]
    rows[4]["status"], rows[4]["error"] = "failed", "nan in latents"  # file exists, row failed
    m.append(rows)
    assert m.done_ids() == set("abcdf")
    (tmp_path / rows[1]["path"]).unlink()  # missing
    p = tmp_path / rows[2]["path"]  # same size, one byte changed
    data = bytearray(p.read_bytes())
    data[-20] ^= 1
    p.write_bytes(bytes(data))
    with open(tmp_path / rows[3]["path"], "ab") as f:  # grown
        f.write(b"x")
    assert m.done_ids() == {"a", "f"}
    m.append([row("f", status="failed", error="re-render failed")])  # latest row wins
    assert m.done_ids() == {"a"}


def test_crash_on_rename_keeps_previous_manifest(tmp_path, monkeypatch):
    m = Manifest(tmp_path)
    m.append([row("a"), row("b")])
    before = (m.rows(), m.parts())

    def crash(src, dst):
        raise OSError("power cut")
    monkeypatch.setattr(jobs.images.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        m.append([row("a", status="failed"), row("c")])
    monkeypatch.undo()
    assert (m.rows(), m.parts()) == before
    assert os.listdir(tmp_path / "manifest") == [p.name for p in before[1]]


def test_crash_mid_write_keeps_previous_manifest(tmp_path, monkeypatch):
    m = Manifest(tmp_path)
    m.append([row("a")])
    before = m.rows()

    def torn(table, where, **kw):
        where.write(b"PAR1 half a footer")
        raise KeyboardInterrupt
    monkeypatch.setattr(jobs.manifest.pq, "write_table", torn)
    with pytest.raises(KeyboardInterrupt):
        m.append([row("b")])
    monkeypatch.undo()
    assert m.rows() == before and len(os.listdir(tmp_path / "manifest")) == 1


def test_leftover_hidden_and_underscore_files_are_ignored(tmp_path):
    m = Manifest(tmp_path)
    m.append([row("a")])
    d = tmp_path / "manifest"
    (d / ".part-99999999999999999999-deadbeef.parquet.0a1b2c3d.tmp").write_bytes(b"PAR1 torn")
    (d / "_SUCCESS").write_bytes(b"")
    (d / ".part-99999999999999999999-cafebabe.parquet").write_bytes(b"PAR1 torn")
    assert m.rows() == [row("a")] and len(m.parts()) == 1
    # outside readers see the same thing
    assert pds.dataset(d, format="parquet").to_table().to_pylist() == [row("a")]
    m.compact()
    assert m.rows() == [row("a")]


def test_compact(tmp_path):
    m = Manifest(tmp_path)
    m.append([row("a", status="failed"), row("b")])
    m.append([row("c")])
    m.append([row("a")])
    before = m.rows()
    new = m.compact()
    assert m.parts() == [new] and m.rows() == before
    assert pq.read_table(new).num_rows == 3
    assert m.compact() == new and m.parts() == [new] and m.rows() == before  # idempotent
    m.append([row("d")])
    assert [r["image_id"] for r in m.rows()] == ["b", "c", "a", "d"]


def test_crash_between_compact_write_and_delete(tmp_path, monkeypatch):
    m = Manifest(tmp_path)
    for iid in "abc":
        m.append([row(iid, status="failed")])
    m.append([row("b")])
    before, old = m.rows(), m.parts()
    real, calls = pathlib.Path.unlink, []

    def flaky_unlink(self, *a, **kw):
        calls.append(self)
        if len(calls) == 2:
            raise OSError("killed")
        real(self, *a, **kw)
    monkeypatch.setattr(pathlib.Path, "unlink", flaky_unlink)
    with pytest.raises(OSError, match="killed"):
        m.compact()
    monkeypatch.undo()
    assert len(m.parts()) == len(old)  # one old part gone, the compacted one added
    assert m.rows() == before
    new = m.compact()
    assert m.parts() == [new] and m.rows() == before


def test_old_part_without_a_newer_column_still_reads(tmp_path, monkeypatch):
    m = Manifest(tmp_path)
    m.append([row("a")])  # written before the column existed
    newer = SCHEMA.append(pa.field("aesthetic_score", pa.float64()))
    monkeypatch.setattr(jobs.manifest, "SCHEMA", newer)
    m.append([row("b", aesthetic_score=0.25)])
    got = m.rows()
    assert got == [row("a", aesthetic_score=None), row("b", aesthetic_score=0.25)]
    assert m.table().schema == newer
    m.compact()
    assert m.rows() == got


def test_part_from_an_older_writer_with_fewer_columns_reads(tmp_path):
    m = Manifest(tmp_path)
    old = pa.Table.from_pylist([{k: v for k, v in row("a").items() if k not in ("worker", "bytes")}],
                               schema=pa.schema([f for f in SCHEMA if f.name not in ("worker", "bytes")]))
    (tmp_path / "manifest").mkdir()
    pq.write_table(old, tmp_path / "manifest" / "part-00000000000000000001-00000000.parquet")
    m.append([row("b")])
    assert m.rows() == [row("a", worker=None, bytes=None), row("b")]


# --- resume at one stat an image, torn parts, recovery, partitions ------------------------------------------

def test_done_is_one_stat_an_image_and_verify_hashes(tmp_path, monkeypatch):
    m = Manifest(tmp_path)
    rows = [_ok_image(tmp_path, m, iid, i) for i, iid in enumerate("abc")]
    for r in rows:
        r["mtime_ns"] = (tmp_path / r["path"]).stat().st_mtime_ns
    m.append(rows)
    p = tmp_path / rows[1]["path"]  # same size, one byte changed, time stamp put back: only a hash sees it
    data, st = bytearray(p.read_bytes()), p.stat()
    data[-20] ^= 1
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(tmp_path / rows[2]["path"], ns=(1, 1))  # touched: rendered again
    hashed = []
    monkeypatch.setattr(jobs.manifest, "sha256_file", lambda path: hashed.append(path) or jobs.images.sha256_file(path))
    assert set(m.done()) == {"a", "b"} and hashed == [] and m.changed == {"c"}
    assert set(m.done(verify=True)) == {"a", "c"} and len(hashed) == 3 and m.changed == {"b"}  # c: same bytes


def test_rows_without_a_time_stamp_are_hashed_once_and_upgraded(tmp_path):
    m = Manifest(tmp_path)
    m.append([_ok_image(tmp_path, m, iid, i) for i, iid in enumerate("ab")])  # an older writer's rows
    assert set(m.done()) == {"a", "b"}
    assert all(r["mtime_ns"] == (tmp_path / r["path"]).stat().st_mtime_ns for r in m.rows())
    assert len(m.rows()) == 2


def test_a_torn_part_is_skipped_with_a_warning_and_moved_aside(tmp_path, caplog):
    m = Manifest(tmp_path, "date=2026-12-01")
    m.append([row("a")])
    torn = m.append([row("b"), row("c")])
    torn.write_bytes(torn.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="tessera"):
        assert [r["image_id"] for r in m.rows()] == ["a"]
    assert m.unreadable == [torn] and any(str(torn) in msg for msg in caplog.messages)
    assert m.compact() is not None and torn.exists()  # compaction leaves it for repair
    (moved,) = m.repair()
    assert moved == torn.parent / "_torn" / torn.name and moved.is_file() and not torn.exists()
    assert [r["image_id"] for r in m.rows()] == ["a"] and m.unreadable == []
    table = pds.dataset(tmp_path / "manifest", format="parquet", partitioning="hive").to_table()
    assert table["image_id"].to_pylist() == ["a"] and table["date"].to_pylist() == ["2026-12-01"]


def test_recover_adopts_only_a_file_that_carries_the_id(tmp_path):
    cfg = TesseraConfig()
    cfg.job.seeds = [1, 2]
    a, b = plan(cfg)
    write_image(np.zeros((8, 8, 3), np.uint8), tmp_path, a.path, "png", 95, a.parameters_text("1368x768>3840x2160"))
    write_image(np.zeros((8, 8, 3), np.uint8), tmp_path, b.path, "png", 95, a.parameters_text())  # another's
    r = jobs.manifest.recover(a, tmp_path)
    assert (r["status"], r["worker"], r["stages"], r["bytes"]) == ("ok", "recovered", "1368x768>3840x2160",
                                                                   (tmp_path / a.path).stat().st_size)
    assert r["sha256"] == jobs.images.sha256_file(tmp_path / a.path) and "recovered" in r["warnings"]
    assert jobs.manifest.recover(b, tmp_path) is None
    (tmp_path / a.path).write_bytes(b"not a png")
    assert jobs.manifest.recover(a, tmp_path) is None


def test_compact_mine_merges_only_this_writers_parts(tmp_path):
    old = Manifest(tmp_path)
    old.append([row("x")])
    m = Manifest(tmp_path)
    for iid in "abcd":
        m.append([row(iid)])
    assert len(m.parts()) == 5
    merged = m.compact_mine()
    assert m.parts() == sorted([old.parts()[0], merged]) and m.mine == [merged]
    assert [r["image_id"] for r in m.rows()] == ["x", "a", "b", "c", "d"]
