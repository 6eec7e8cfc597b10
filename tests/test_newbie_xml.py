"""NewBie's XML prompts (jobs/xml_prompts.py): parsing, each error naming its tag, the position table (against the
README's), the split into region prompts, flattening for the other families, the plan's regions and ids, the text
NewBie's encoders read, and one tiny render of placed characters through the renderer."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALL, compose
from jobs import ConfigError, TesseraConfig, plan, validate
from jobs import xml_prompts as xp
from jobs.spec import RegionConfig, validate_region
from test_newbie import cfg_of, model, modules_cache, newbie_dir  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
# finetune.py's system prompt for XML captions, written out (not imported).
XML_SYSTEM = "You are an assistant designed to generate high-quality anime images based on xml format prompts."

TWO = """<character_1>
<n>miku</n>
<gender>1girl</gender>
<appearance>blue_hair, blue_eyes, twintails</appearance>
<position>Center-Left</position>
</character_1>
<character_2>
<n>rin</n>
<gender>1girl</gender>
<appearance>blonde_hair</appearance>
<position>background_right</position>
</character_2>
<character_3>
<n>len</n>
<gender>1boy</gender>
</character_3>
<general_tags>
<count>2girls, 1boy</count>
<style>anime_style</style>
<background>city, night &amp; rain</background>
</general_tags>"""

GENERAL_XML = ("<general_tags>\n<style>anime_style</style>\n<background>city, night &amp; rain</background>\n"
               "</general_tags>")


def newbie_cfg(*prompts, **job) -> TesseraConfig:
    cfg = TesseraConfig()
    cfg.model.name, cfg.model.weights = "newbie", "random"
    cfg.job.width, cfg.job.height, cfg.job.prompts = 1024, 512, list(prompts)
    for k, v in job.items():
        setattr(cfg.job, k, v)
    return cfg


# ---------------------------------------------------------------------------------------------- parsing


def test_an_xml_prompt_is_one_that_opens_a_section():
    assert xp.is_xml(TWO) and xp.is_xml("  \n<general_tags><style>x</style></general_tags>")
    assert xp.is_xml("<character_5></character_5>")  # detected, then refused (below)
    for plain in ("a cliff at dusk", "<lora:foo:1> a cat", "masterpiece, <character_1>", "<foo>a</foo>", ""):
        assert not xp.is_xml(plain)


def test_sections_and_fields_are_read_in_order():
    sections = xp.parse(TWO)
    assert [s.tag for s in sections] == ["character_1", "character_2", "character_3", "general_tags"]
    assert sections[0].fields == (("n", "miku"), ("gender", "1girl"), ("appearance", "blue_hair, blue_eyes, twintails"),
                                  ("position", "Center-Left"))
    assert sections[3].get("background") == "city, night & rain"  # entities decoded
    assert xp.position_of(sections[0]) == "center_left" and xp.position_of(sections[2]) is None
    caption = xp.parse("<general_tags><style>a</style></general_tags>\n<caption>Two girls wave.</caption>")
    assert caption[1] == xp.Section("caption", (("caption", "Two girls wave."),))


def err(prompt: str) -> str:
    with pytest.raises(ConfigError) as e:
        xp.check(prompt, "job.prompts[0]")
    assert e.value.field_name == "job.prompts[0]"
    return str(e.value)


@pytest.mark.parametrize("prompt,message", [
    ("<character_1><n>a</character_1>", "job.prompts[0]='<n>': malformed XML: <n> is still open where </character_1> "
                                        "closes"),
    ("<character_1><n>a</n>", "job.prompts[0]='<character_1>': malformed XML: <character_1> is never closed"),
    ("<character_1></n></character_1>", "job.prompts[0]='<character_1>': malformed XML: <character_1> is still open "
                                        "where </n> closes"),
    ("<character_1>\n<n>a</n>\n<appearance>x & y</appearance></character_1>",
     "job.prompts[0]='<appearance>': malformed XML at line 3, column 16: not well-formed (invalid token) (write &, < "
     "and > in a tag as &amp;, &lt; and &gt;)"),
    ("<character_1><appearance><hair>x</hair></appearance></character_1>",
     "job.prompts[0]='<character_1><appearance><hair>': nesting deeper than two levels"),
    ("<character_5><n>e</n></character_5>",
     "job.prompts[0]='<character_5>': more than four characters: NewBie's XML prompts hold <character_1> ... "
     "<character_4>"),
    ("<character_0><n>e</n></character_0>", "job.prompts[0]='<character_0>': characters are numbered"),
    ("<character_2><position>middle</position></character_2>",
     "job.prompts[0]='<character_2><position>': unknown position 'middle': a column (left, center_left, center, "
     "center_right, right), optionally after a row (foreground_, top_, bottom_, background_), or a row alone"),
    ("<character_1><appearance>blue_eyes, long_hair</appearance><expression>red_eyes</expression></character_1>",
     "job.prompts[0]='<character_1>': conflicting eye colours: blue_eyes (<appearance>) and red_eyes (<expression>); "
     "one a character, or add heterochromia"),
    ("<character_1><appearance>blonde_hair, light_blue_hair</appearance></character_1>",
     "job.prompts[0]='<character_1>': conflicting hair colours: blonde_hair (<appearance>) and light_blue_hair "
     "(<appearance>); one a character, or add multicolored_hair"),
    ("<character_1><gender>1girl</gender><appearance>1boy</appearance></character_1>",
     "job.prompts[0]='<character_1>': conflicting genders: 1girl (<gender>) and 1boy (<appearance>); one a character"),
    ("<character_1><position>left</position></character_1><character_2><position>LEFT</position></character_2>",
     "job.prompts[0]='<character_2><position>': 'left' is <character_1>'s position too"),
    ("<character_1><n>a</n></character_1><character_1><n>b</n></character_1>",
     "job.prompts[0]='<character_1>': given twice: write each section once"),
    ("<character_1><n>a</n><n>b</n></character_1>", "job.prompts[0]='<character_1><n>': given twice"),
    ("<character_1 id='2'><n>a</n></character_1>", "job.prompts[0]='<character_1>': XML attributes (id) are not read"),
    ("<character_1>1girl<n>a</n></character_1>", "job.prompts[0]='<character_1>': holds text outside its fields"),
    ("<general_tags><style>a</style></general_tags>, masterpiece", "job.prompts[0]=', masterpiece': text outside the "
                                                                   "sections (after </general_tags>)"),
    ("<general_tags></general_tags><scene>x</scene>", "job.prompts[0]='<scene>': unknown section"),
])
def test_each_error_names_the_field_and_the_tag(prompt, message):
    assert err(prompt).startswith(message)


def test_what_is_not_a_conflict():
    for ok in ("<character_1><appearance>blue_eyes, red_eyes, heterochromia</appearance></character_1>",
               "<character_1><appearance>pink_hair, two-tone_hair, black_hair</appearance></character_1>",
               "<character_1><appearance>grey_hair, gray_hair, long_hair, very_long_hair</appearance></character_1>",
               "<character_1><appearance>blue_eyes</appearance></character_1>"
               "<character_2><appearance>red_eyes</appearance></character_2>",  # two characters, one each
               "<character_1><appearance>closed_eyes, hair_between_eyes, blue_eyes</appearance></character_1>"):
        xp.parse(ok)


# ------------------------------------------------------------------------------------------ positions


def test_the_position_table_is_columns_times_rows_and_every_box_is_a_valid_region():
    assert len(xp.POSITIONS) == 5 * 5 + 4
    assert xp.POSITIONS["left"] == (0.0, 0.0, 0.4, 1.0) and xp.POSITIONS["right"] == (0.6, 0.0, 1.0, 1.0)
    assert xp.POSITIONS["center"] == (0.3, 0.0, 0.7, 1.0)
    assert xp.POSITIONS["background_right"] == (0.6, 0.1, 1.0, 0.7)
    assert xp.POSITIONS["top_center_left"] == (0.2, 0.0, 0.5, 0.6)
    assert xp.POSITIONS["background"] == xp.POSITIONS["background_center"] == (0.3, 0.1, 0.7, 0.7)
    assert xp.POSITIONS["foreground_left"] == xp.POSITIONS["left"]
    for name, box in xp.POSITIONS.items():
        validate_region(f"<position>{name}", RegionConfig(box=list(box), prompt="x"))


def test_the_readme_documents_the_table():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### NewBie's XML prompts"):text.index("### Real weights")]
    cells = dict(re.findall(r"^\| (.+?) \| ([0-9.]+ to [0-9.]+) \|$", section, flags=re.M))
    columns = {k.strip("`"): tuple(map(float, v.split(" to "))) for k, v in cells.items() if not k.endswith("_`")
               and not k.startswith("none")}
    rows = {k.strip("`").rstrip("_"): tuple(map(float, v.split(" to "))) for k, v in cells.items()
            if k.endswith("_`")}
    rows[""] = tuple(map(float, cells["none (`left`, ...)"].split(" to ")))
    assert columns == xp.COLUMNS and rows == xp.ROWS


# --------------------------------------------------------------------------------- split and flatten


def test_placed_characters_become_regions_over_the_unplaced_and_the_general_tags():
    split = xp.expand(TWO, "newbie")
    assert split.format == "xml"
    assert split.background == ("<character_1>\n<n>len</n>\n<gender>1boy</gender>\n</character_1>\n\n" + GENERAL_XML)
    (box1, miku), (box2, rin) = split.regions
    assert box1 == xp.POSITIONS["center_left"] and box2 == xp.POSITIONS["background_right"]
    assert miku == ("<character_1>\n<n>miku</n>\n<gender>1girl</gender>\n"
                    "<appearance>blue_hair, blue_eyes, twintails</appearance>\n</character_1>\n\n" + GENERAL_XML)
    assert rin.startswith("<character_1>\n<n>rin</n>") and "<position>" not in rin and "<count>" not in rin
    for text in (split.background, miku, rin):  # each is a well-formed XML prompt of its own
        assert xp.is_xml(text) and xp.parse(text)


def test_a_prompt_without_positions_goes_whole_as_written():
    plain = re.sub(r"<position>.*?</position>\n", "", TWO)
    assert xp.expand(plain, "newbie") == xp.XmlSplit("xml", plain, ())
    assert xp.expand("a cat", "newbie") is None and xp.expand("a cat", "sd") is None


def test_all_placed_leaves_the_general_tags_as_background_and_count_and_caption_out():
    p = ("<character_1><n>a</n><position>left</position></character_1>"
         "<general_tags><count>1girl</count><caption>A girl.</caption></general_tags><caption>A girl.</caption>")
    split = xp.expand(p, "newbie")
    assert split.background == ""
    assert split.regions == ((xp.POSITIONS["left"], "<character_1>\n<n>a</n>\n</character_1>"),)


def test_other_families_get_tags():
    split = xp.expand(TWO, "sdxl")
    assert split.format == "tags"
    assert split.background == "len, 1boy, anime style, city, night & rain"
    assert [t for _, t in split.regions] == [
        "miku, 1girl, blue hair, blue eyes, twintails, anime style, city, night & rain",
        "rin, 1girl, blonde hair, anime style, city, night & rain"]
    whole = xp.expand("<character_1><n>hatsune_miku</n><position></position></character_1>"
                      "<general_tags><count>1girl</count><other>^_^</other></general_tags>", "sd")
    assert whole == xp.XmlSplit("tags", "hatsune miku, 1girl, ^_^", ())  # not split: <count> stays


# ------------------------------------------------------------------------------------------- the plan


def test_the_plan_yields_the_characters_as_regions_and_ids_that_cover_them():
    cfg = newbie_cfg(TWO, negative_prompt="lowres")
    validate(cfg)
    req = plan(cfg)[0]
    split = xp.expand(TWO, "newbie")
    assert req.prompt == split.background and req.negative_prompt == "lowres"
    assert [(r.box, r.prompt, r.negative_prompt, r.weight, r.feather) for r in req.regions] == [
        (box, text, "lowres", 1.0, 0.05) for box, text in split.regions]
    assert req.prompt_pairs()[1] == (split.regions[0][1], "lowres")
    row = json.loads(req.manifest_row()["regions"])
    assert [r["box"] for r in row] == [list(xp.POSITIONS["center_left"]), list(xp.POSITIONS["background_right"])]
    moved = plan(newbie_cfg(TWO.replace("background_right", "right")))[0]
    unplaced = plan(newbie_cfg(re.sub(r"<position>.*?</position>\n", "", TWO)))[0]
    assert len({req.image_id, moved.image_id, unplaced.image_id}) == 3 and unplaced.regions == ()
    assert plan(newbie_cfg(TWO, negative_prompt="lowres"))[0].image_id == req.image_id


def test_job_regions_come_first_and_a_template_wraps_before_parsing():
    cfg = newbie_cfg(TWO, regions=[RegionConfig(box=[0, 0, 1, 0.2], prompt="<general_tags><other>moon</other>"
                                                                          "</general_tags>")])
    req = plan(cfg)[0]
    assert [r.box for r in req.regions] == [(0.0, 0.0, 1.0, 0.2), xp.POSITIONS["center_left"],
                                            xp.POSITIONS["background_right"]]
    templated = newbie_cfg(TWO, prompt_template="{prompt}, masterpiece")
    with pytest.raises(ConfigError, match=r"^job.prompts\[0\]=', masterpiece': text outside the sections"):
        plan(templated)


def test_other_families_plan_flattened_regions():
    cfg = newbie_cfg(TWO)
    cfg.model.name, cfg.model.weights = "demo", "pretrained"
    req = plan(cfg)[0]
    assert req.prompt == "len, 1boy, anime style, city, night & rain" and len(req.regions) == 2
    assert req.regions[0].prompt.startswith("miku, 1girl, blue hair")


def test_plain_prompts_keep_their_ids_and_requests():
    cfg = newbie_cfg("a cliff at dusk")
    req = plan(cfg)[0]
    assert req.prompt == "a cliff at dusk" and req.regions == ()
    cfg.job.prompts = ["<general_tags><style>a</style></general_tags>"]  # XML, not split: the id marks the format
    xml = plan(cfg)[0]
    assert xml.prompt == cfg.job.prompts[0] and xml.regions == () and xml.image_id != req.image_id


def test_a_bad_prompt_or_row_stops_the_plan_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"^job.prompts\[1\]='<character_5>': more than four characters"):
        plan(newbie_cfg("a cat", "<character_5><n>e</n></character_5>"))
    rows = tmp_path / "night.jsonl"
    rows.write_text(json.dumps({"prompt": "a cat"}) + "\n" + json.dumps({"prompt": TWO.replace("Center-Left", "mid")})
                    + "\n", encoding="utf-8")
    cfg = newbie_cfg("a dog", prompt_file=str(rows))
    with pytest.raises(ConfigError) as e:
        plan(cfg)
    assert str(e.value) == (f"job.prompt_file={str(rows)!r}: line 2: prompt='<character_1><position>': unknown "
                            "position 'mid': a column (left, center_left, center, center_right, right), optionally "
                            "after a row (foreground_, top_, bottom_, background_), or a row alone (README: the "
                            "position table)")


def test_run_py_refuses_a_bad_xml_prompt_with_exit_2_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    bad = "<character_1><appearance>blue_eyes, red_eyes</appearance></character_1>"
    r = subprocess.run([sys.executable, "run.py", f"job.prompts=['{bad}']", f"output.dir={out}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "error: job.prompts[0]='<character_1>': conflicting eye colours: blue_eyes (<appearance>)" in r.stderr
    assert not out.exists()


def test_the_readme_command_composes_and_plans():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### NewBie's XML prompts"):text.index("### Real weights")]
    override = re.search(r'"(job\.prompts=\[.*\])"', section).group(1)
    req = plan(compose("model=newbie", "model.weights=random", override))[0]
    assert [r.box for r in req.regions] == [xp.POSITIONS["left"], xp.POSITIONS["background_right"]]
    assert req.prompt == "<general_tags>\n<style>anime_style</style>\n<background>city, night</background>\n" \
                         "</general_tags>"


# --------------------------------------------------------------------------------- the model, a render


def test_newbie_reads_xml_behind_its_xml_system_prompt(model):
    text, negative = model._texts(TWO, "lowres")
    assert text == f"{XML_SYSTEM} <Prompt Start> {TWO}" and negative == f"{XML_SYSTEM} <Prompt Start> lowres"
    assert model._texts("a red fox", "")[0].startswith("You are an assistant designed to generate high-quality anime "
                                                       "images with the highest degree")  # plain: as before
    cond = model.encode(TWO, "")
    assert cond.pooled[1].tolist() == model._pooled(TWO)[0].tolist()  # Jina CLIP reads the XML as it is


def region_latents(renderer, req):
    """The final latent of `req` denoised as a worker does it: each tile under the prompts whose boxes it touches."""
    from tiling.render import denoise_request

    conds = [renderer.model.encode(*pair) for pair in req.prompt_pairs()]
    return denoise_request(lambda bs, t: [renderer._predict(b, t, conds[b.prompt], req.guidance) for b in bs],
                           renderer.info(), req)


def test_a_tiny_newbie_render_draws_each_placed_character_under_its_own_prompt(newbie_dir, tmp_path):
    from cluster.renderer import Renderer

    p = ("<character_1><n>a</n><position>left</position></character_1>"
         "<character_2><n>b</n><position>right</position></character_2>"
         "<general_tags><background>sea</background></general_tags>")
    cfg = cfg_of(newbie_dir, "job.width=256", "job.height=128", "job.steps=2", "tiling.tile=16", "tiling.overlap=4",
                 "tiling.vae_tile=16", "tiling.vae_overlap=4", "job.strategy=direct", f"output.dir={tmp_path}")
    cfg.job.prompts = [p]
    r = Renderer(cfg.model, cfg.output)
    req = plan(cfg)[0]
    row = r.render(req)
    assert row["status"] == "ok", row["error"]
    assert (tmp_path / row["path"]).stat().st_size > 0
    pairs = req.prompt_pairs()  # the background and the two characters, each encoded once
    assert len(set(pairs)) == 3 and all(pair in r.model._cache for pair in pairs) and len(r.model._cache) == 3
    assert [x["box"] for x in json.loads(row["regions"])] == [[0.0, 0.0, 0.4, 1.0], [0.6, 0.0, 1.0, 1.0]]
    # Placement: both steps lie in MultiDiffusion's bootstrapping (t >= 800 at NewBie's shift 6), where a tile
    # under several prompts shows each only its own part: another left character changes the left box's columns
    # and leaves those where the right box alone counts (x >= 0.625: latent columns 20 and up) exactly as they were.
    z = region_latents(r, req)
    cfg.job.prompts = [p.replace("<n>a</n>", "<n>zz</n>")]
    other = plan(cfg)[0]
    assert other.regions[1] == req.regions[1] and other.regions[0] != req.regions[0]
    dz = (region_latents(r, other) - z).abs()
    assert dz[..., :12].mean() > 1e-2 and dz[..., 20:].max() == 0
