import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from conftest import compose
from jobs import ConfigError, ImageRequest, TesseraConfig, image_id, plan, validate

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"


def make_cfg(**sections) -> TesseraConfig:
    """A small valid config; ``sections`` maps 'job' etc. to a dict of field overrides."""
    cfg = TesseraConfig()
    cfg.job.width, cfg.job.height = 1024, 512
    for section, values in sections.items():
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    return cfg


def test_plan_is_prompt_major_and_drops_duplicates():
    cfg = make_cfg(job=dict(name="night", prompts=["a", "b", "a"], seeds=[3, 1, 3]))
    reqs = plan(cfg)
    assert [(r.prompt, r.seed) for r in reqs] == [("a", 3), ("a", 1), ("b", 3), ("b", 1)]
    assert len({r.image_id for r in reqs}) == 4
    r = reqs[0]
    assert (r.job, r.model, r.width, r.height, r.steps, r.guidance, r.scheduler) == (
        "night", "demo", 1024, 512, 20, 7.0, "euler")
    assert (r.tiling_method, r.tile, r.overlap, r.format) == ("gaussian", 64, 16, "png")
    assert r.path == f"images/night/{r.image_id}.png"


def test_prompt_file_comes_after_prompts(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# comment\n  c  \n\nb\na\n", encoding="utf-8")
    reqs = plan(make_cfg(job=dict(prompts=["a", "b"], prompt_file=str(f), seeds=[0])))
    assert [r.prompt for r in reqs] == ["a", "b", "c"]


@pytest.mark.parametrize("fmt,ext", [("png", "png"), ("webp", "webp"), ("jpeg", "jpg")])
def test_path_extension(fmt, ext):
    r = plan(make_cfg(output=dict(format=fmt)))[0]
    assert r.path == f"images/default/{r.image_id}.{ext}" and r.format == fmt


def test_default_id_is_pinned():
    # Changing how ids are computed orphans every manifest on disk: do it on purpose only.
    # Session 5: the progressive base drawn whole, the guide clock, and tiling.vae_tile=0 (auto) by default;
    # session 6: the stages' low-frequency anchor on, dilated sampling off (was ef0443b88a0a4cd7, then
    # 1e55594e8375e94a as `demo`); the random-weight demo became demo_random (as `demo` its direct ids were
    # 12586ca1c66aba3f and b79a9ac34f12103c), and `demo` the shipped trained model, whose ids name its weights.
    cfg = TesseraConfig()
    cfg.model.name = "demo_random"
    assert plan(cfg)[0].image_id == "85723375e79f9df2"
    cfg.job.strategy = "direct"
    assert plan(cfg)[0].image_id == "5399da7a7ec461f1"
    cfg.tiling.vae_tile = 64
    assert plan(cfg)[0].image_id == "699813879b103c2e"
    assert plan(TesseraConfig())[0].image_id == "a88a6df068bbebe1"  # the shipped demo with the default job
    # `python3 run.py`: the demo's own job, its VAE attention over 4096 pooled keys (exact, it was b91d5be3f987871e)
    # session 16: the demo job enlarges 1.83x a stage (job.stage_factor 2, was 4: bc4d6fe559c22056, b91d5be3f987871e
    # and 5d3db9eb4c3f01fe below)
    assert plan(compose("model=demo"))[0].image_id == "29516aa0538a1ca0"
    assert plan(compose("model=demo", "tiling.vae_attention_keys=0"))[0].image_id == "4fc78e44dd09150d"
    assert plan(compose("model=demo", "model.vae=light"))[0].image_id == "36e11c38bc9ae854"  # its light VAE


def test_id_is_16_hex_and_repeatable():
    a, b = plan(make_cfg())[0].image_id, plan(make_cfg())[0].image_id
    assert a == b and len(a) == 16 and int(a, 16) >= 0


CHANGES_PIXELS = [
    ("model", "name", "demo"), ("model", "name", "demo_random"), ("model", "path", "OTHER"), ("model", "dtype", "fp16"),
    ("job", "prompts", ["another prompt"]), ("job", "negative_prompt", "blurry"),
    ("job", "seeds", [1]), ("job", "width", 1032), ("job", "height", 520), ("job", "steps", 21),
    ("job", "guidance", 7.5), ("job", "scheduler", "ddim"),
    ("tiling", "method", "uniform"), ("tiling", "tile", 96), ("tiling", "overlap", 8),
    ("tiling", "batch", 8), ("tiling", "vae_tile", 32), ("tiling", "vae_overlap", 4), ("tiling", "vae_passes", 1),
    ("tiling", "vae_attention_keys", 4096),
    ("tiling", "wrap", "x"),
    ("job", "prompt_template", "archer style, {prompt}"),
    ("job", "strategy", "direct"), ("job", "strength", 0.5), ("job", "stage_factor", 1.5), ("job", "base_size", 384),
    ("job", "upscale", "latent"), ("job", "skip_residual", 3.0), ("job", "dilation", 0.5), ("job", "anchor", 0.0),
    ("job", "anchor_sigma", 2.0), ("job", "anchor_detail", 0.9), ("job", "sharpen", 2.0), ("job", "color_fix", 2.0),
    ("model", "deep_cache", 3),
]
KEEPS_PIXELS = [
    ("job", "name", "other_job"), ("output", "dir", "/elsewhere"), ("output", "format", "webp"),
    ("output", "quality", 50), ("cluster", "workers", 8), ("cluster", "address", "auto"),
    ("cluster", "mode", "tile_parallel"), ("cluster", "cpus_per_worker", 2),
    ("model", "path", "a/"), ("job", "guidance", 7),  # the same folder; 7 == 7.0
    ("model", "attention", "xformers"), ("model", "offload", "model"), ("model", "allow_pickle", True),
    ("model", "trust_remote_code", True), ("job", "prompt_template", "{prompt}"),
    ("model", "deep_cache", 1),  # every step: the exact model
]


def _base(tmp_path):
    for name in ("a", "OTHER"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "model_index.json").write_text("{}")
    return make_cfg(model=dict(name="sd15", path=str(tmp_path / "a")))


@pytest.mark.parametrize("section,name,value", CHANGES_PIXELS)
def test_id_changes_with(tmp_path, section, name, value):
    base = _base(tmp_path)
    changed = _base(tmp_path)
    setattr(getattr(changed, section), name, str(tmp_path / value) if value == "OTHER" else value)
    if (section, name, value) == ("model", "name", "demo"):
        changed.model.path = None  # the shipped demo takes none
    assert plan(changed)[0].image_id != plan(base)[0].image_id


@pytest.mark.parametrize("section,name,value", KEEPS_PIXELS)
def test_id_ignores(tmp_path, section, name, value):
    base = _base(tmp_path)
    changed = _base(tmp_path)
    setattr(getattr(changed, section), name, str(tmp_path / value) if value == "a/" else value)
    assert plan(changed)[0].image_id == plan(base)[0].image_id


def test_random_demo_model_id_ignores_its_cache_folder(tmp_path):
    a, b = (make_cfg(model=dict(name="demo_random", path=str(tmp_path / d))) for d in "xy")
    assert plan(a)[0].image_id == plan(b)[0].image_id


def test_the_shipped_demo_takes_no_path_and_its_id_names_its_weights(monkeypatch):
    """The demo's folder is where the install put it; its id says which weights it holds (so a manifest of the
    random-weight demo, once `demo` too, is never taken for the trained one's)."""
    with pytest.raises(ConfigError, match=r"^model.path='/w': the demo model's weights ship with Tessera"):
        plan(make_cfg(model=dict(path="/w")))
    ids = {plan(make_cfg(model=dict(name=n)))[0].image_id for n in ("demo", "demo_random")}
    monkeypatch.setattr(sys.modules["jobs.plan"], "DEMO_WEIGHTS", "other-weights")
    ids.add(plan(make_cfg())[0].image_id)
    assert len(ids) == 3


def test_id_of_a_pair_does_not_depend_on_the_other_prompts_or_seeds():
    one = plan(make_cfg(job=dict(prompts=["b"], seeds=[5])))[0]
    many = plan(make_cfg(job=dict(prompts=["a", "b"], seeds=[1, 5])))
    assert one == [r for r in many if (r.prompt, r.seed) == ("b", 5)][0]
    assert one.image_id == image_id(make_cfg(), "b", 5)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from("abcd"), min_size=1, max_size=6),
       st.lists(st.integers(0, 4), min_size=1, max_size=6))
def test_plan_is_the_ordered_set_of_pairs(prompts, seeds):
    reqs = plan(make_cfg(job=dict(prompts=prompts, seeds=seeds)))
    want = list(dict.fromkeys((p, s) for p in prompts for s in seeds))
    assert [(r.prompt, r.seed) for r in reqs] == want


def test_prompt_template_gives_the_effective_prompt_and_its_id():
    templated = plan(make_cfg(job=dict(prompts=["a lake", "a cliff"], prompt_template="archer style, {prompt}")))
    assert [r.prompt for r in templated] == ["archer style, a lake", "archer style, a cliff"]
    spelled_out = plan(make_cfg(job=dict(prompts=["archer style, a lake"])))[0]
    assert templated[0].image_id == spelled_out.image_id  # the same pixels, the same id
    assert templated[0].parameters_text().startswith("archer style, a lake\n")


def test_random_weights_are_marked_in_the_model_column_and_the_id():
    r = plan(make_cfg(model=dict(name="sdxl", weights="random")))[0]
    assert r.model == "sdxl+random" and r.manifest_row()["model"] == "sdxl+random"
    assert "Model: sdxl+random" in r.parameters_text()


def test_plan_validates():
    with pytest.raises(ConfigError, match="job.steps=0"):
        plan(make_cfg(job=dict(steps=0)))


def _changed(value):
    """Another value of a spec field's kind (+2: model.deep_cache 0 and 1 both mean every step)."""
    if isinstance(value, bool) or value is None:
        return "other"
    if isinstance(value, (int, float)):
        return value + 2
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple) and value and hasattr(value[0], "_replace"):  # region prompts
        return (value[0]._replace(weight=value[0].weight + 1),) + value[1:]
    raise AssertionError(f"no other value for {value!r}")


def test_every_field_of_the_render_spec_is_in_the_image_id_and_nothing_else_is(tmp_path):
    """The spec holds what changes the pixels: change any of its fields and the id changes (but the init
    picture's size, which its sha256 decides); the request's own fields (where the image goes, its labels) and
    the config's other sections leave it as it is. The id is the spec's hash, so a replaced field is a new id."""
    from PIL import Image

    from jobs import RegionConfig, RenderSpec

    region = RegionConfig(box=[0, 0, 0.5, 1], prompt="a night landscape")
    Image.new("RGB", (512, 256)).save(tmp_path / "init.png")
    r = plan(make_cfg(job=dict(init_image=str(tmp_path / "init.png"), dilation=0.3, sharpen=1.0,
                               regions=[region])))[0]
    spec = {f.name: getattr(r, f.name) for f in dataclasses.fields(RenderSpec) if f.init}
    assert RenderSpec(**spec).image_id == r.image_id
    for name, value in spec.items():
        if name in ("init_size", "xml"):
            continue
        other = dataclasses.replace(r, **{name: _changed(value)})
        assert other.image_id != r.image_id, name
    assert dataclasses.replace(r, init_size=(256, 128)).image_id == r.image_id
    for name in ("job", "folder", "init_image", "stage_model", "vae_model"):
        assert dataclasses.replace(r, **{name: "elsewhere"}).image_id == r.image_id, name
    moved = make_cfg(job=dict(init_image=str(tmp_path / "init.png"), dilation=0.3, sharpen=1.0, name="other",
                              regions=[region]),
                     output=dict(dir=str(tmp_path / "out"), format="webp"), cluster=dict(workers=3, group=2))
    again = plan(moved)[0]
    assert again.image_id == r.image_id and again.path == f"images/other/{r.image_id}.webp"


def test_parameters_text():
    r = plan(make_cfg(job=dict(prompts=["a lake"], negative_prompt="blurry, text", seeds=[1],
                               width=3840, height=2160)))[0]
    def tail_of(req):  # a replaced field is another spec: another id
        return ("Tiling: gaussian 64/16, Strategy: progressive x2 from native, Anchor: 1, Anchor sigma: 1, "
                f"Denoising strength: 0.3, Tessera image id: {req.image_id}")

    tail = tail_of(r)
    assert r.parameters_text() == (
        "a lake\nNegative prompt: blurry, text\n"
        f"Steps: 20, Sampler: euler, CFG scale: 7.0, Seed: 1, Size: 3840x2160, Model: demo, {tail}")
    no_neg = dataclasses.replace(r, negative_prompt="")
    assert no_neg.parameters_text().splitlines()[:2] == ["a lake", "Steps: 20, Sampler: euler, "
        f"CFG scale: 7.0, Seed: 1, Size: 3840x2160, Model: demo, {tail_of(no_neg)}"]
    assert no_neg.image_id != r.image_id
    direct = dataclasses.replace(r, strategy="direct")
    assert direct.parameters_text().endswith(f"Tiling: gaussian 64/16, Tessera image id: {direct.image_id}")


def test_manifest_row():
    r = plan(make_cfg(job=dict(prompts=["p"], seeds=[9])))[0]
    row = r.manifest_row(status="ok", worker="w0")
    assert row == {
        "image_id": r.image_id, "job": "default", "prompt": "p", "negative_prompt": "", "seed": 9,
        "model": "demo", "width": 1024, "height": 512, "steps": 20, "guidance": 7.0,
        "scheduler": "euler", "tiling_method": "gaussian", "tile": 64, "overlap": 16,
        "path": r.path, "wrap": "none", "status": "ok", "worker": "w0", "strategy": "progressive",
        "strength": 0.3, "init_image": None, "init_sha256": None, "regions": None,
        "deep_cache": 0}


def test_request_is_frozen():
    r = plan(make_cfg())[0]
    assert isinstance(r, ImageRequest)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.seed = 2


def test_jobs_imports_neither_torch_nor_ray():
    code = "import sys, jobs; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# --- jobs.spec.validate --------------------------------------------------------------------------

def test_defaults_are_valid():
    cfg = TesseraConfig()
    assert validate(cfg) is cfg


BAD = [
    ("job", "width", 0, "job.width"), ("job", "width", -5, "job.width"),
    ("job", "width", 100000, "job.width"), ("job", "height", 0, "job.height"),
    ("job", "steps", 0, "job.steps"), ("job", "guidance", -1, "job.guidance"),
    ("job", "guidance", 100, "job.guidance"), ("job", "prompts", [], "job.prompts"),
    ("job", "prompts", [""], "job.prompts"), ("job", "prompts", ["ok", "  "], "job.prompts"),
    ("job", "seeds", [], "job.seeds"), ("job", "seeds", [-1], "job.seeds"),
    ("job", "scheduler", "heun9000", "job.scheduler"), ("job", "name", "a/b", "job.name"),
    ("job", "prompt_file", "/no/such/prompts.txt", "job.prompt_file"),
    ("model", "name", "sdxl-nope", "model.name"), ("model", "dtype", "fp8", "model.dtype"),
    ("tiling", "overlap", 64, "tiling.overlap"), ("tiling", "overlap", 65, "tiling.overlap"),
    ("tiling", "method", "square", "tiling.method"), ("tiling", "tile", 4, "tiling.tile"),
    ("output", "format", "gif", "output.format"), ("output", "quality", 0, "output.quality"),
    ("cluster", "workers", 0, "cluster.workers"), ("cluster", "mode", "fast", "cluster.mode"),
    ("job", "scheduler", "flow_euler", "job.scheduler"), ("job", "prompt_template", "no slot", "job.prompt_template"),
    ("model", "weights", "zeros", "model.weights"), ("model", "attention", "flash9", "model.attention"),
    ("model", "offload", "disk", "model.offload"),
    ("job", "strategy", "sideways", "job.strategy"), ("job", "strength", 0.0, "job.strength"),
    ("job", "strength", 1.01, "job.strength"), ("job", "stage_factor", 1.0, "job.stage_factor"),
    ("job", "base_size", 10, "job.base_size"), ("job", "upscale", "nearest", "job.upscale"),
    ("job", "skip_residual", -1.0, "job.skip_residual"), ("job", "dilation", -0.5, "job.dilation"),
    ("job", "anchor", 1.5, "job.anchor"), ("job", "anchor_sigma", 0.0, "job.anchor_sigma"),
    ("job", "anchor_detail", 1.0, "job.anchor_detail"), ("job", "anchor_detail", 0.0, "job.anchor_detail"),
    ("job", "sharpen", -1.0, "job.sharpen"), ("job", "sharpen_sigma", 0.0, "job.sharpen_sigma"),
    ("job", "color_fix", -1.0, "job.color_fix"), ("job", "color_fix", 65.0, "job.color_fix"),
    ("job", "init_image", "/no/such/picture.png", "job.init_image"),
    ("tiling", "vae_attention_keys", 10, "tiling.vae_attention_keys"),
    ("tiling", "vae_attention_keys", -1, "tiling.vae_attention_keys"),
]


@pytest.mark.parametrize("section,name,value,field_name", BAD)
def test_validate_names_field_and_value(section, name, value, field_name):
    cfg = make_cfg(**{section: {name: value}})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.field_name == field_name and e.value.value == value
    assert str(e.value).startswith(f"{field_name}={value!r}: ")


def test_sharpen_needs_the_pixel_upscale():
    with pytest.raises(ConfigError, match=r"^job.sharpen=2.0: sharpens the enlarged picture of job.upscale=pixel"):
        validate(make_cfg(job=dict(sharpen=2.0, upscale="latent")))
    with pytest.raises(ConfigError, match=r"^job.color_fix=1.0: fixes the enlarged picture of job.upscale=pixel"):
        validate(make_cfg(job=dict(color_fix=1.0, upscale="latent")))


def test_validate_model_path_must_exist():
    cfg = make_cfg(model=dict(name="sd15", path="/no/such/model"))
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value) == "model.path='/no/such/model': no such file or folder"


def test_validate_real_model_needs_a_path():
    with pytest.raises(ConfigError, match=r"^model.path=None: model=sd15 needs"):
        validate(make_cfg(model=dict(name="sd15")))


def test_validate_accepts_existing_model_path(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    validate(make_cfg(model=dict(name="sd15", path=str(tmp_path))))


def test_validate_refuses_a_folder_that_is_no_diffusers_pipeline(tmp_path):
    with pytest.raises(ConfigError, match="model.path=.*no model_index.json"):
        validate(make_cfg(model=dict(name="sd15", path=str(tmp_path))))


def test_plan_takes_hydra_dictconfig():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.structured(TesseraConfig)
    cfg.job.seeds = [0, 1]
    cfg.job.guidance = 7  # typed float: stored as 7.0
    assert plan(cfg) == plan(make_cfg(job=dict(width=3840, height=2160, seeds=[0, 1])))


def test_scheduler_auto_is_the_familys_first_and_keeps_ids():
    cfg = TesseraConfig()
    assert cfg.job.scheduler == "auto" and plan(cfg)[0].scheduler == "euler"
    explicit = dataclasses.replace(cfg, job=dataclasses.replace(cfg.job, scheduler="euler"))
    assert plan(explicit)[0].image_id == plan(cfg)[0].image_id
    dit = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="z_image", weights="random"),
                              tiling=dataclasses.replace(cfg.tiling, tile=128, overlap=32))
    assert plan(dit)[0].scheduler == "flow_euler"


def test_model_vae_is_named_in_the_id_and_parameters():
    """`model.vae`: another VAE changes the pixels, so the id; the light one by name (its folder moves with the
    install), a folder by its real path; the parameters name it."""
    light, full = plan(compose("model=demo", "model.vae=light"))[0], plan(compose("model=demo"))[0]
    folder = plan(compose("model=demo", f"model.vae={ROOT / 'models' / 'scenes-sd' / 'vae'}"))[0]
    assert len({light.image_id, full.image_id, folder.image_id}) == 3
    assert (light.vae_model, full.vae_model, folder.vae_model) == ("light", None, "vae")
    assert "VAE: light" in light.parameters_text() and "VAE:" not in full.parameters_text()


def test_a_hires_checkpoint_is_checked_and_named_in_the_id_and_parameters(tmp_path):
    """`model.stage_path`: a diffusers folder of the model's family; only the stages' weights, so a direct render
    keeps its id; pixel upscale only (the stages' VAE is another's)."""
    zoom = str(ASSETS / "scenes-sd-zoom")
    base = plan(compose("model=demo"))[0]
    hires = plan(compose("model=demo", f"model.stage_path={zoom}"))[0]
    assert hires.image_id != base.image_id and hires.stage_model == "scenes-sd-zoom"
    assert "Hires checkpoint: scenes-sd-zoom" in hires.parameters_text() and base.stage_model is None
    direct = ("model=demo", "job.strategy=direct")
    assert plan(compose(*direct, f"model.stage_path={zoom}"))[0].image_id == plan(compose(*direct))[0].image_id
    for overrides, field in (([f"model.stage_path={tmp_path}"], "model.stage_path"),
                             ([f"model.stage_path={ASSETS / 'scenes-zimage'}"], "model.stage_path"),
                             ([f"model.stage_path={zoom}", "job.upscale=latent"], "job.upscale"),
                             ([f"model.stage_path={zoom}", "model.name=sd15", "model.weights=random"],
                              "model.stage_path")):
        with pytest.raises(ConfigError) as e:
            plan(compose("model=demo", *overrides))
        assert e.value.field_name == field, e.value
