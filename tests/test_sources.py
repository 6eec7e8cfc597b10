"""Prompt sources (jobs.sources) and the streamed, dated plan: formats, per-row fields, and one clear error for
every bad source, naming the field and the row."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import ConfigError, Plan, TesseraConfig, plan
from jobs.sources import rows

ROOT = Path(__file__).resolve().parents[1]


def cfg_of(source, **job) -> TesseraConfig:
    cfg = TesseraConfig()
    cfg.job.prompts, cfg.job.prompt_file, cfg.job.width, cfg.job.height = [], str(source), 1024, 512
    for k, v in job.items():
        setattr(cfg.job, k, v)
    return cfg


def test_text_skips_comments_and_blanks(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# a comment\n\n  a lake at dawn  \n   # indented comment\nprompt # with a hash\n", encoding="utf-8")
    assert [(r.where, r.prompt) for r in rows(str(f))] == [("line 3", "a lake at dawn"), ("line 5", "prompt # with a hash")]


def test_jsonl_csv_and_parquet_rows_give_the_same_plan(tmp_path):
    objs = [{"prompt": "a lake"}, {"prompt": "a cliff", "negative_prompt": "blurry", "seeds": [4, 5]},
            {"prompt": "a dune", "width": 768, "height": 256, "steps": 9, "guidance": 3, "strategy": "direct"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(o) for o in objs) + "\n\n", encoding="utf-8")
    (tmp_path / "p.csv").write_text('prompt,negative_prompt,seeds,width,height,steps,guidance,strategy\n'
                                    'a lake,,,,,,,\n"a cliff",blurry,4 5,,,,,\n'
                                    'a dune,,,768,256,9,3,direct\n', encoding="utf-8")
    keys = sorted({k for o in objs for k in o})
    table = pa.Table.from_pylist([{k: o.get(k) for k in keys} for o in objs])
    pq.write_table(table, tmp_path / "p.parquet")
    (tmp_path / "ds").mkdir()
    pq.write_table(table.slice(0, 2), tmp_path / "ds" / "part-0.parquet")
    pq.write_table(table.slice(2), tmp_path / "ds" / "part-1.parquet")
    (tmp_path / "ds" / "_SUCCESS").write_text("")
    plans = {name: plan(cfg_of(tmp_path / name, seeds=[0])) for name in ("p.jsonl", "p.csv", "p.parquet", "ds")}
    want = plans.pop("p.jsonl")
    assert [(r.prompt, r.seed, r.negative_prompt, r.width, r.height, r.steps, r.guidance, r.strategy) for r in want] == [
        ("a lake", 0, "", 1024, 512, 20, 7.0, "progressive"), ("a cliff", 4, "blurry", 1024, 512, 20, 7.0, "progressive"),
        ("a cliff", 5, "blurry", 1024, 512, 20, 7.0, "progressive"), ("a dune", 0, "", 768, 256, 9, 3.0, "direct")]
    for name, got in plans.items():
        assert got == want, name


def test_a_row_with_overrides_has_the_id_of_the_job_that_spells_them_out(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a dune", "width": 768, "steps": 9, "seeds": [3]}\n')
    (row,) = plan(cfg_of(tmp_path / "p.jsonl"))
    spelled = TesseraConfig()
    spelled.job.prompts, spelled.job.width, spelled.job.height, spelled.job.steps, spelled.job.seeds = \
        ["a dune"], 768, 512, 9, [3]
    assert row == plan(spelled)[0]


def test_a_rows_regions_give_the_plan_of_the_job_that_spells_them_out(tmp_path):
    """Per-row region prompts (JSONL objects, a CSV cell of JSON, a Parquet list of structs) replace the job's:
    the same requests, ids included, as `job.regions` written out."""
    regions = [{"box": [0, 0, 0.33, 1], "prompt": "a dusk landscape"},
               {"box": [0.67, 0, 1, 1], "prompt": "a night landscape", "weight": 0.8, "feather": 0.1}]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a day landscape", "regions": regions}) + "\n"
                                      + json.dumps({"prompt": "a lake"}) + "\n")
    cell = json.dumps(regions).replace('"', '""')
    (tmp_path / "p.csv").write_text(f'prompt,regions\n"a day landscape","{cell}"\na lake,\n', encoding="utf-8")
    full = [{"negative_prompt": None, "weight": 1.0, "feather": 0.05, **r} for r in regions]
    pq.write_table(pa.Table.from_pylist([{"prompt": "a day landscape", "regions": full},
                                         {"prompt": "a lake", "regions": None}]), tmp_path / "p.parquet")
    from jobs.spec import RegionConfig
    spelled = cfg_of(tmp_path / "p.jsonl")
    spelled.job.prompt_file, spelled.job.prompts = None, ["a day landscape"]
    spelled.job.regions = [RegionConfig(**r) for r in regions]
    want = plan(spelled)[0]
    for name in ("p.jsonl", "p.csv", "p.parquet"):
        with_regions, plain = plan(cfg_of(tmp_path / name))
        assert with_regions == want and len(with_regions.regions) == 2, name
        assert plain.regions == () and plain.image_id != want.image_id


def test_the_plan_is_streamed_and_counted_first(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("".join(f"prompt {i}\n" for i in range(1000)) + "prompt 3\n")
    night = Plan(cfg_of(f, seeds=[1, 2]))
    assert (night.rows, night.images) == (1001, 2002)
    it = iter(night)
    assert next(it).prompt == "prompt 0"  # nothing read past what is asked for
    assert sum(1 for _ in it) == 1999 and night.duplicates == 2


def test_date_partition_paths(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a\n")
    dated = Plan(cfg_of(f, date="2026-12-01", name="nightly"))
    (r,) = list(dated)
    assert dated.partition == "date=2026-12-01" and r.path == f"images/date=2026-12-01/nightly/{r.image_id}.png"
    assert plan(cfg_of(f, name="nightly"))[0].image_id == r.image_id  # the date is not in the id
    import datetime
    assert Plan(cfg_of(f, date="today")).date == datetime.date.today().isoformat()
    for bad in ("2026-13-01", "yesterday", "2026-1-1"):
        with pytest.raises(ConfigError, match="job.date"):
            Plan(cfg_of(f, date=bad))


def _write(tmp_path, name, data):
    p = tmp_path / name
    if isinstance(data, pa.Table):
        pq.write_table(data, p)
    elif isinstance(data, bytes):
        p.write_bytes(data)
    elif data is not None:
        p.write_text(data, encoding="utf-8")
    return p


BAD_SOURCES = [
    ("missing.txt", None, "no such file or folder"),
    ("empty.txt", "", "the file is empty"),
    ("comments.txt", "# only\n\n", "holds no prompt"),
    ("binary.txt", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "a binary file"),
    ("latin1.txt", "caf\xe9\n".encode("latin-1"), "line 1: not UTF-8"),
    ("bad.jsonl", '{"prompt": "a"}\n{"prompt": "b",\n', "line 2: not JSON"),
    ("list.jsonl", '["a"]\n', "line 1: a JSON list"),
    ("model.jsonl", '{"prompt": "a"}\n{"prompt": "b", "model": "sdxl"}\n', "line 2: unknown key 'model'"),
    ("code.jsonl", '{"prompt": "a", "trust_remote_code": true}\n', "line 1: unknown key 'trust_remote_code'"),
    ("noprompt.jsonl", '{"negative_prompt": "a"}\n', "line 1: prompt=None"),
    ("width.jsonl", '{"prompt": "a"}\n{"prompt": "b", "width": 0}\n', "line 2: width=0: must be an integer"),
    ("seeds.jsonl", '{"prompt": "a", "seeds": "x"}\n', "line 1: seeds='x'"),
    ("box.jsonl", '{"prompt": "a", "regions": [{"box": [0, 0, 1.5, 1], "prompt": "b"}]}\n',
     "line 1: regions[0].box=[0, 0, 1.5, 1]: must lie in [0, 1]"),
    ("region-key.jsonl", '{"prompt": "a", "regions": [{"box": [0, 0, 1, 1], "prompt": "b", "model": "x"}]}\n',
     "line 1: regions[0]: unknown key 'model'"),
    ("regions.jsonl", '{"prompt": "a", "regions": {"box": [0, 0, 1, 1]}}\n', "line 1: regions="),
    ("regions.csv", "prompt,regions\na,[{oops\n", "line 2: regions='[{oops': not JSON"),
    ("path.csv", "prompt,model_path\na,/w\n", "the header: unknown column 'model_path'"),
    ("ragged.csv", "prompt,steps\na,3,4\n", "line 2: 3 fields"),
    ("steps.csv", "prompt,steps\na,many\n", "line 2: steps='many': not a number"),
    ("noprompt.parquet", pa.table({"text": ["a"]}), "no prompt column"),
    ("extra.parquet", pa.table({"prompt": ["a"], "model": ["x"]}), "unknown column 'model'"),
    ("torn.parquet", b"PAR1\0\0garbage", "unreadable Parquet file"),
    ("empty.parquet", pa.table({"prompt": pa.array([], pa.string())}), "holds no"),
]


@pytest.mark.parametrize("name,data,message", BAD_SOURCES, ids=[b[0] for b in BAD_SOURCES])
def test_a_bad_source_is_one_error_naming_the_field_and_the_row(tmp_path, name, data, message):
    path = _write(tmp_path, name, data)
    with pytest.raises(ConfigError) as e:
        Plan(cfg_of(path))
    assert e.value.field_name == "job.prompt_file" and message in str(e.value), str(e.value)
    assert str(e.value).startswith(f"job.prompt_file={str(path)!r}: ")


@pytest.mark.parametrize("name,data,message", [BAD_SOURCES[i] for i in (0, 1, 3, 5, 7, 15)],
                         ids=[BAD_SOURCES[i][0] for i in (0, 1, 3, 5, 7, 15)])
def test_run_py_refuses_a_bad_source_with_exit_2_and_writes_nothing(tmp_path, name, data, message):
    path = _write(tmp_path, name, data)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "run.py", "job=nightly", f"job.prompt_file={path}", f"output.dir={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: job.prompt_file=") and message in lines[0]
    assert not out.exists()


def test_nightly_without_a_source_names_the_field():
    from conftest import compose

    with pytest.raises(ConfigError, match="job.prompts=.*job.prompt_file"):
        Plan(compose("job=nightly"))


def test_the_nightly_config_builds_a_dated_plan_of_its_source(tmp_path):
    import datetime

    from conftest import compose

    f = tmp_path / "p.txt"
    f.write_text("a\nb\n")
    cfg = compose("job=nightly", f"job.prompt_file={f}")
    assert (cfg.job.name, cfg.job.prompts, cfg.job.date) == ("nightly", [], "today")
    night = Plan(cfg)
    assert night.date == datetime.date.today().isoformat() and night.images == 2
    assert Plan(compose("job=nightly", f"job.prompt_file={f}", "job.date=2026-12-01")).partition == "date=2026-12-01"
