"""The static gallery (jobs.gallery): thumbnails, cards, filter and sort, in a real headless Chromium where one is
installed (Debian's `chromium`), else by parsing the HTML only."""
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import Manifest
from jobs.gallery import THUMB, main, record_sweep_job, write_gallery, write_sweep_gallery

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
PROMPTS = ["a dusk landscape", "a day landscape", "a night landscape, dusk sky"]


def fake_output(out: Path, job: str = "default", seam=(1.01, 1.30, 0.99)) -> list:
    """Three written images (1024x576 PNGs) and one failed row in `out`'s manifest."""
    rows = []
    for k, (prompt, score) in enumerate(zip(PROMPTS, seam)):
        iid = f"{job[:4]}{k:012x}"
        path = f"images/{job}/{iid}.png"
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((576, 1024, 3), 60 * k, np.uint8)).save(out / path)
        from jobs import sha256_file

        rows.append(dict(image_id=iid, job=job, prompt=prompt, negative_prompt="", seed=k, model="sd15", width=1024,
                         height=576, steps=25, guidance=4.0, scheduler="ddim", tiling_method="gaussian", tile=32,
                         overlap=8, status="ok", path=path, sha256=sha256_file(out / path),
                         bytes=(out / path).stat().st_size, started_at=T0, finished_at=T0 + timedelta(minutes=k + 1),
                         seconds_denoise=10.0 * (3 - k), seconds_decode=1.0, worker="w", seam_score=score,
                         seam_score_vae=1.0, strategy="progressive", stages="344x192>592x336>1024x576",
                         regions=None if k != 1 else '[{"box": [0.0, 0.0, 0.333, 1.0], "prompt": "a moonlit lake", '
                                                     '"negative_prompt": "", "weight": 1.0, "feather": 0.05}]'))
    rows.append(dict(image_id=f"{job[:4]}failed000000", job=job, prompt="a broken <b>prompt</b>", seed=9,
                     status="failed", error="RuntimeError: out of memory", started_at=T0,
                     finished_at=T0 + timedelta(minutes=9)))
    Manifest(out).append(rows)
    return rows


class Items(HTMLParser):
    """The page's items (class "item"), their data attributes, their <img> sources, and every URL it names."""

    def __init__(self):
        super().__init__()
        self.items, self.urls, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "item" in (a.get("class") or "").split():
            self.items.append({"attrs": a, "imgs": []})
        if tag == "img" and self.items:
            self.items[-1]["imgs"].append(a["src"])
        self.urls += [a[k] for k in ("src", "href") if k in a]


def parse(path: Path) -> Items:
    p = Items()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_gallery_has_a_small_webp_thumbnail_per_written_image_and_the_failed_one_with_its_error(tmp_path):
    fake_output(tmp_path)
    page = write_gallery(tmp_path)
    assert page == tmp_path / "gallery.html"
    p = parse(page)
    assert len(p.items) == 4
    ok = [i for i in p.items if i["attrs"]["data-status"] == "ok"]
    assert len(ok) == 3 and all(len(i["imgs"]) == 1 and i["imgs"][0].startswith("thumbs/") for i in ok)
    for i in ok:
        with Image.open(tmp_path / i["imgs"][0]) as im:
            assert im.format == "WEBP" and im.size[0] <= THUMB[0] and im.size[1] <= THUMB[1] and im.size[0] >= 200
        assert (tmp_path / i["imgs"][0]).stat().st_size < 5000
    text = page.read_text()
    assert "RuntimeError: out of memory" in text and "a broken &lt;b&gt;prompt&lt;/b&gt;" in text  # escaped
    for needle in ("a moonlit lake [0, 0, 0.33, 1]", "a dusk landscape", "344x192&gt;592x336&gt;1024x576", "1.300",
                   "denoise 30.0 s", "1024x576"):
        assert needle in text
    # nothing from a network: no external URL, no stylesheet or script file
    assert not [u for u in p.urls if re.match(r"[a-z]+://|//", u)] and "link" not in p.tags
    assert all((tmp_path / u).is_file() for u in p.urls)  # every link and thumbnail resolves from the page's folder
    mtimes = {u: (tmp_path / u).stat().st_mtime_ns for u in p.urls if u.startswith("thumbs/")}
    write_gallery(tmp_path)  # thumbnails are made once per file
    assert mtimes == {u: (tmp_path / u).stat().st_mtime_ns for u in mtimes}


def test_the_cli_writes_the_page_and_refuses_a_folder_that_is_no_output(tmp_path, capsys):
    fake_output(tmp_path)
    assert main([str(tmp_path)]) == 0 and (tmp_path / "gallery.html").is_file()
    assert main([str(tmp_path / "images")]) == 2
    code = "import sys, jobs.gallery; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # torch-free, like the rest of jobs/


def test_a_sweep_gallery_has_one_row_per_image_with_the_swept_values_as_columns(tmp_path):
    out = tmp_path / "outputs"
    rows = fake_output(out)
    sweep = out / "sweeps" / "2026-12-01_12-00-00"
    common = ["job.width=1024", "job.height=576"]
    record_sweep_job(sweep / "0", common + ["tiling.method=uniform"], out, [r["image_id"] for r in rows[:2]])
    record_sweep_job(sweep / "1", common + ["tiling.method=gaussian"], out, [r["image_id"] for r in rows[2:]])
    page = write_sweep_gallery(sweep)
    text = page.read_text()
    heads = re.findall(r"<th>([^<]*)</th>", text)
    assert heads[:2] == ["job", "tiling.method"]  # the unswept overrides are no column
    p = parse(page)
    assert [(i["attrs"]["data-swept-0"], i["attrs"]["data-swept-1"]) for i in p.items] == \
        [("0", "uniform"), ("0", "uniform"), ("1", "gaussian"), ("1", "gaussian")]
    assert all((sweep / u).is_file() for u in p.urls)  # thumbnails and images found from the sweep's folder
    assert main([str(sweep)]) == 0


def chromium_dom(page: Path, fragment: str = "") -> str:
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
                        "--dump-dom", page.resolve().as_uri() + fragment], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "</html>" in r.stdout, r.stderr[-2000:]
    return r.stdout


def shown(dom: str) -> list:
    """The prompts of the items the page shows, in page order."""
    items = re.findall(r'<figure class="item[^"]*"([^>]*)>.*?<p class="prompt">([^<]*)', dom)
    return [prompt for attrs, prompt in items if " hidden" not in attrs]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")
def test_in_chromium_the_page_loads_from_a_file_url_filters_and_sorts(tmp_path):
    fake_output(tmp_path)
    page = write_gallery(tmp_path)
    everything = chromium_dom(page)
    assert len(shown(everything)) == 4 and 'id="count">4 of 4 shown' in everything  # the script ran
    assert shown(chromium_dom(page, "#q=dusk")) == ["a night landscape, dusk sky", "a dusk landscape"]
    assert shown(chromium_dom(page, "#q=night%20dusk")) == ["a night landscape, dusk sky"]
    assert shown(chromium_dom(page, "#q=nothing-like-it")) == []
    assert shown(chromium_dom(page, "#q=moonlit")) == ["a day landscape"]  # a region's prompt
    assert shown(chromium_dom(page, "#status=failed")) == ["a broken &lt;b&gt;prompt&lt;/b&gt;"]
    assert shown(chromium_dom(page, "#sort=seam:desc&status=ok")) == \
        ["a day landscape", "a dusk landscape", "a night landscape, dusk sky"]
    assert shown(chromium_dom(page, "#sort=seconds:asc&status=ok"))[0] == "a night landscape, dusk sky"
