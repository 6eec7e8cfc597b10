"""Size presets: `size=<name>` (conf/size/) sets job.width x job.height exactly; job.width / job.height still win."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose
from jobs import validate

ROOT = Path(__file__).resolve().parents[1]
ISSUE = {"4k": (3840, 2160), "5k_ultrawide": (5120, 1440), "8k": (7680, 4320), "phone": (1170, 2532),
         "dual_4k": (7680, 2160), "1080p": (1920, 1080), "1440p": (2560, 1440), "ultrawide": (3440, 1440),
         "720p": (1280, 720), "5k": (5120, 2880)}
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "size").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(ISSUE))
def test_a_preset_is_its_exact_size(name):
    j = compose(f"size={name}").job
    assert (j.width, j.height) == ISSUE[name]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_and_validates(name):
    cfg = validate(compose(f"size={name}"))
    assert cfg.job.width % 2 == 0 and cfg.job.height % 2 == 0 and cfg.job.prompts  # nothing else of the job moved


def test_width_and_height_override_a_preset_and_a_preset_overrides_the_job_group():
    assert (compose("size=4k", "job.width=1000").job.width, compose("size=4k", "job.width=1000").job.height) \
        == (1000, 2160)
    assert (compose("job.height=600", "size=8k").job.height) == 600  # the command line's values, in any order
    smoke = compose("job=smoke", "size=dual_4k").job
    assert (smoke.name, smoke.steps, smoke.width, smoke.height) == ("smoke", 8, 7680, 2160)
    assert (compose("job=smoke").job.width, compose("job=smoke").job.height) == (768, 512)  # no preset: the job's


@pytest.mark.parametrize("args", [["size=nope"], ["-m", "size=4k,nope"]], ids=["run", "sweep"])
def test_an_unknown_preset_is_one_error_naming_it_and_writes_nothing(tmp_path, args):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "run.py", *args, f"output.dir={out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("error:") == 1 and "size='nope'" in r.stderr and "4k" in r.stderr
    assert not out.exists()
