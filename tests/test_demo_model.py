"""Tests for models/demo.py: the shipped trained demo model (model=demo, package data), and the tiny random-weight
SD 1.x-style pipeline (model=demo_random), saved and loaded offline."""

import logging
import os
import threading

import numpy as np
import pytest
import torch

from models import demo
from models.demo import (
    DEMO_VERSION,
    SHIPPED_DEMO,
    SHIPPED_LIGHT_VAE,
    build_demo_pipeline,
    default_demo_path,
    ensure_demo,
    load_demo_pipeline,
    shipped_demo_path,
    shipped_light_vae_path,
)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return ensure_demo(str(tmp_path_factory.mktemp("cache") / "demo"))


@pytest.fixture(scope="module")
def pipe(saved):
    return load_demo_pipeline(saved)


def _generate(pipe, seed, prompt="a cat and a dog"):
    return pipe(
        prompt,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images


def test_default_demo_path(monkeypatch, tmp_path):
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path))
    assert default_demo_path() == os.path.join(str(tmp_path), f"demo-v{DEMO_VERSION}")
    monkeypatch.delenv("TESSERA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_demo_path() == os.path.join(
        str(tmp_path / "home"), ".cache", "tessera", f"demo-v{DEMO_VERSION}"
    )
    assert DEMO_VERSION == "1"


def test_ensure_demo_builds_once(tmp_path, monkeypatch):
    target = str(tmp_path / "demo")
    assert ensure_demo(target) == target
    names = sorted(os.listdir(target))
    assert names == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    for sub, weights in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ]:
        assert os.path.isfile(os.path.join(target, sub, weights))
    assert os.path.isfile(os.path.join(target, "tokenizer", "vocab.json"))
    assert os.path.isfile(os.path.join(target, "tokenizer", "merges.txt"))
    # Nothing but the final folder is left in the parent (the temp sibling was renamed).
    assert os.listdir(tmp_path) == ["demo"]

    index = os.path.join(target, "model_index.json")
    before = (os.stat(index).st_mtime_ns, os.stat(os.path.join(target, "unet")).st_mtime_ns)

    def fail(*a, **k):
        raise AssertionError("ensure_demo rebuilt an existing pipeline")

    monkeypatch.setattr(demo, "build_demo_pipeline", fail)
    assert ensure_demo(target) == target
    after = (os.stat(index).st_mtime_ns, os.stat(os.path.join(target, "unet")).st_mtime_ns)
    assert after == before
    assert os.listdir(tmp_path) == ["demo"]


def test_ensure_demo_default_path_uses_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "cache"))
    path = ensure_demo()
    assert path == os.path.join(str(tmp_path / "cache"), f"demo-v{DEMO_VERSION}")
    assert os.path.isfile(os.path.join(path, "model_index.json"))


def test_ensure_demo_race_keeps_one(tmp_path, monkeypatch):
    """Two callers that both build before either renames: one wins, the other's copy is removed."""
    target = str(tmp_path / "demo")
    barrier = threading.Barrier(2, timeout=60)
    real_build = demo.build_demo_pipeline

    def build_then_wait(seed=0):
        p = real_build(seed)
        barrier.wait()
        return p

    monkeypatch.setattr(demo, "build_demo_pipeline", build_then_wait)
    results, errors = [], []

    def call():
        try:
            results.append(ensure_demo(target))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert results == [target, target]
    assert os.listdir(tmp_path) == ["demo"]
    assert os.path.isfile(os.path.join(target, "model_index.json"))


def test_ensure_demo_refuses_foreign_folder(tmp_path):
    target = tmp_path / "demo"
    target.mkdir()
    (target / "something.txt").write_text("not a pipeline")
    with pytest.raises(RuntimeError, match="no model_index.json"):
        ensure_demo(str(target))
    assert sorted(os.listdir(tmp_path)) == ["demo"]
    assert os.listdir(target) == ["something.txt"]


def test_ensure_demo_fills_empty_folder(tmp_path):
    target = tmp_path / "demo"
    target.mkdir()
    assert ensure_demo(str(target)) == str(target)
    assert (target / "model_index.json").is_file()


def test_build_is_deterministic_per_seed():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_demo_pipeline(seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG state is untouched
    b = build_demo_pipeline(seed=0)
    c = build_demo_pipeline(seed=1)
    for name in ("unet", "vae", "text_encoder"):
        sa = getattr(a, name).state_dict()
        sb = getattr(b, name).state_dict()
        sc = getattr(c, name).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point()), name
    w = "conv_in.weight"
    assert torch.equal(a.unet.state_dict()[w], b.unet.state_dict()[w])
    assert not torch.equal(a.unet.state_dict()[w], c.unet.state_dict()[w])
    assert a.unet.state_dict()[w].abs().sum() > 0


def test_architecture_shapes():
    p = build_demo_pipeline()
    assert p.vae_scale_factor == 8
    assert p.vae.config.latent_channels == 4
    assert p.vae.config.scaling_factor == pytest.approx(0.18215)
    assert p.unet.config.sample_size == 64
    assert p.unet.config.in_channels == 4
    assert p.unet.config.cross_attention_dim == p.text_encoder.config.hidden_size == 32
    assert p.text_encoder.config.max_position_embeddings == 77
    s = p.scheduler.config
    assert type(p.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (s.beta_start, s.beta_end, s.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (s.num_train_timesteps, s.steps_offset) == (1000, 1)
    assert p.safety_checker is None and p.feature_extractor is None
    with torch.no_grad():
        z = torch.randn(1, 4, 8, 8)
        assert tuple(p.vae.decode(z).sample.shape) == (1, 3, 64, 64)
        x = torch.randn(2, 3, 64, 64)
        assert tuple(p.vae.encode(x).latent_dist.mean.shape) == (1 * 2, 4, 8, 8)
        out = p.unet(torch.randn(2, 4, 16, 16), 10, torch.randn(2, 77, 32)).sample
        assert tuple(out.shape) == (2, 4, 16, 16)


def test_load_has_no_weight_warnings(saved):
    import diffusers
    import transformers

    handler = _Records()
    loggers = [logging.getLogger("diffusers"), logging.getLogger("transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    old = (diffusers.logging.get_verbosity(), transformers.logging.get_verbosity())
    diffusers.logging.set_verbosity_warning()
    transformers.logging.set_verbosity_warning()
    try:
        p = load_demo_pipeline(saved)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        diffusers.logging.set_verbosity(old[0])
        transformers.logging.set_verbosity(old[1])
    bad = [
        r.getMessage()
        for r in handler.records
        if any(w in r.getMessage().lower() for w in ("missing", "unexpected", "newly initialized", "not used", "not initialized"))
    ]
    assert bad == []
    # The loaded weights are exactly the built ones.
    ref = build_demo_pipeline(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        loaded = getattr(p, name).state_dict()
        built = getattr(ref, name).state_dict()
        assert loaded.keys() == built.keys()
        assert all(torch.equal(loaded[k], built[k]) for k in built), name
    assert p.safety_checker is None
    assert p.vae_scale_factor == 8


def test_loaded_tokenizer_encodes_77_ids(pipe):
    tok = pipe.tokenizer
    assert tok.model_max_length == 77
    enc = tok(
        "a photo of the cat and a dog",
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
    )
    ids = enc.input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id
    assert tok.eos_token_id in ids
    assert ids[-1] == tok.pad_token_id
    assert max(ids) < pipe.text_encoder.config.vocab_size
    # Merged words are single tokens; others fall back to byte-level characters.
    assert tok.tokenize("the cat") == ["the</w>", "cat</w>"]
    assert tok.tokenize("Zebra!") == ["z", "e", "b", "r", "a</w>", "!</w>"]
    # Long prompts are truncated to 77 ids.
    assert len(tok("word " * 200, truncation=True, max_length=77).input_ids) == 77


def test_pipeline_generates_deterministic_image(pipe):
    img = _generate(pipe, seed=0)
    assert img.shape == (1, 64, 64, 3)
    assert img.dtype == np.float32
    assert np.isfinite(img).all()
    assert img.min() >= 0.0 and img.max() <= 1.0
    assert img.std() > 1e-3  # not constant
    again = _generate(pipe, seed=0)
    np.testing.assert_array_equal(img, again)
    other = _generate(pipe, seed=1)
    assert not np.array_equal(img, other)


# ------------------------------------------------------------------------ the shipped demo model (model=demo)


def test_the_shipped_demo_is_package_data_of_models():
    """Every file of models/scenes-sd and of its light VAE matches pyproject.toml's package-data, so a wheel and an
    editable install carry both folders (a file the globs miss would be left out of a wheel)."""
    import fnmatch
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert "models" in project["tool"]["setuptools"]["packages"]
    globs = project["tool"]["setuptools"]["package-data"]["models"]
    pkg = root / "models"
    assert Path(SHIPPED_DEMO) == pkg / "scenes-sd" and shipped_demo_path() == SHIPPED_DEMO
    assert Path(SHIPPED_LIGHT_VAE) == pkg / "scenes-sd-light-vae" and shipped_light_vae_path() == SHIPPED_LIGHT_VAE
    files = [p.relative_to(pkg).as_posix() for d in ("scenes-sd", "scenes-sd-light-vae") for p in (pkg / d).rglob("*")
             if p.is_file()]
    assert len(files) == 12 and "scenes-sd/unet/diffusion_pytorch_model.safetensors" in files
    assert "scenes-sd-light-vae/diffusion_pytorch_model.safetensors" in files
    # fnmatch's * also crosses "/", setuptools' does not: match part by part
    def matches(f, g):
        return len(f.split("/")) == len(g.split("/")) and all(map(fnmatch.fnmatchcase, f.split("/"), g.split("/")))
    assert [f for f in files if not any(matches(f, g) for g in globs)] == []


def test_a_missing_shipped_demo_is_one_clear_error(monkeypatch, tmp_path):
    from jobs.spec import ConfigError

    monkeypatch.setattr(demo, "SHIPPED_DEMO", str(tmp_path / "scenes-sd"))
    with pytest.raises(ConfigError, match=r"^model.name='demo': its weights are missing from .*reinstall Tessera"):
        shipped_demo_path()
    monkeypatch.setattr(demo, "SHIPPED_LIGHT_VAE", str(tmp_path / "scenes-sd-light-vae"))
    with pytest.raises(ConfigError, match=r"^model.vae='light': its weights are missing from .*reinstall Tessera"):
        shipped_light_vae_path()


def test_model_demo_is_the_trained_landscape_model_with_its_own_job_and_tiling():
    """`python3 run.py`'s defaults: the shipped model, its prompt and guidance, 256-px tiles; another model gets
    the default job and tiling, and the command line still picks groups."""
    from conftest import compose
    from models import load_model

    cfg = compose("model=demo")
    assert (cfg.model.name, cfg.job.name, cfg.job.prompts, cfg.job.guidance) == ("demo", "demo", ["a dusk landscape"],
                                                                                 4.0)
    assert (cfg.tiling.method, cfg.tiling.tile, cfg.tiling.overlap, cfg.tiling.vae_tile) == ("shifted", 32, 0, 512)
    assert (cfg.job.width, cfg.job.height, cfg.job.seeds, cfg.job.steps) == (3840, 2160, [1], 10)
    assert (cfg.job.strategy, cfg.job.stage_factor, cfg.job.upscale) == ("progressive", 2.0, "pixel")
    other = compose("model=sd15")
    assert (other.job.name, other.job.guidance, other.tiling.tile) == ("default", 7.0, 64)
    assert compose("model=demo", "job=smoke").job.name == "smoke"
    assert compose("model=demo", "tiling=default").tiling.tile == 64
    assert cfg.model.vae is None
    m = load_model(cfg.model)
    assert (m.family, m.native_size, m.weights_kind, m.latent_channels) == ("sd", 256, "pretrained", 4)


def test_model_vae_replaces_the_model_s_own_in_its_latent_space(tmp_path):
    """model.vae: the light VAE or a folder, which must share the model's latent space; bad values are one error
    naming the field, before any weights are read where the config alone can tell."""
    from conftest import compose
    from jobs.spec import ConfigError
    from models import load_model

    full = load_model(compose("model=demo").model).vae
    assert full.config.block_out_channels[0] == 32 and full.config.mid_block_add_attention
    light = load_model(compose("model=demo", "model.vae=light").model).vae  # no attention, 16 channels at the top
    assert (light.config.block_out_channels[0], light.config.mid_block_add_attention) == (16, False)
    folder = load_model(compose("model=demo", f"model.vae={SHIPPED_LIGHT_VAE}").model).vae
    assert torch.equal(folder.decoder.conv_in.weight, light.decoder.conv_in.weight)
    other = tmp_path / "vae"  # another latent space: the random demo's VAE (scaling factor 0.18215)
    ensure_demo(str(tmp_path / "demo"))
    os.symlink(tmp_path / "demo" / "vae", other)
    with pytest.raises(ConfigError, match=r"^model.vae='.*/vae': is not in the model's latent space: scaling_factor"):
        load_model(compose("model=demo", f"model.vae={other}").model)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"")
    for overrides, why in ((["model=demo", f"model.vae={pickled}"], "holds only pickle weights"),
                           (["model=sd15", f"model.path={SHIPPED_DEMO}", "model.vae=light"],
                            "the light VAE is the demo model's own"),
                           (["model=demo", f"model.vae={tmp_path}/none"], "must be a local diffusers VAE folder"),
                           (["model=sdxl", "model.weights=random", "model.vae=light"], "not used with model.weights")):
        with pytest.raises(ConfigError, match=rf"^model.vae='[^']*': {why}"):
            load_model(compose(*overrides).model)


@pytest.mark.parametrize("model", ["demo", "demo_random"])
def test_every_job_and_tiling_option_composes_under_either_demo(model):
    from pathlib import Path

    from conftest import compose

    conf = Path(__file__).resolve().parents[1] / "conf"
    for group in ("job", "tiling"):
        for option in sorted(p.stem for p in (conf / group).glob("*.yaml")):
            cfg = compose(f"model={model}", f"{group}={option}")
            assert cfg.model.name == model
            if group == "job":
                assert cfg.job.name == option
    assert compose("model=demo", "tiling=default").job.name == "demo"  # a group chosen alone leaves the other
