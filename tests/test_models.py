"""Model families: the registry, the SDXL adapter, loading (folders, single files, pickles, random weights).

A tiny SDXL pipeline is built in code (diffusers' own SDXL test configs, widened a little; tokenizers
written offline as models.demo does), saved with save_pretrained and loaded back through load_model.  The
key check: for a canvas that fits in one tile, Tessera's tiled loop gives the latents of the plain
diffusers pipeline for the same noise and settings, for SDXL and for SD 1.x (the demo model).
"""
import dataclasses
import importlib
import shutil

import pytest
import torch
from PIL import Image

from cluster.renderer import Renderer
from conftest import SMALL, assert_renders_small, compose
from jobs import ConfigError, plan, validate
from jobs import families, spec
from models import family, load_model, resolve_path
from models.demo import _build_tokenizer, _write_vocab_files, load_demo_pipeline
from tiling.grid import Tile
from tiling.render import denoise_request

# --------------------------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


def build_tiny_sdxl(width_2: int = 32):
    """A tiny random SDXL pipeline: two CLIP encoders (32 + `width_2` features), a UNet with text_time embedding,
    an 8x VAE with SDXL's scaling factor and force_upcast."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from models.sd import SD_SCHEDULER

    tok = _build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=32 + width_2,
            norm_num_groups=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 32), layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=256, scaling_factor=0.13025, force_upcast=True)
        te = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=32,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
        te_2 = te if width_2 == 32 else CLIPTextConfig(**dict(te.to_dict(), hidden_size=width_2))
        text_encoder, text_encoder_2 = CLIPTextModel(te), CLIPTextModelWithProjection(te_2)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok, tokenizer_2=tok,
        unet=unet, scheduler=EulerDiscreteScheduler(**SD_SCHEDULER), add_watermarker=False)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny-sdxl"
    build_tiny_sdxl().save_pretrained(path)
    for sub in ("tokenizer", "tokenizer_2"):  # as real SDXL folders ship them
        _write_vocab_files(str(path / sub))
    return str(path)


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    return load_model(spec.ModelConfig(name="sdxl", path=sdxl_dir))


def sdxl_cfg(sdxl_dir, *overrides):
    return compose("model=sdxl", f"model.path={sdxl_dir}", *overrides)


def render_latents(renderer: Renderer, req) -> torch.Tensor:
    predict = lambda bs, t: [renderer.predict(b, t, req.prompt, req.negative_prompt, req.guidance) for b in bs]  # noqa: E731
    return denoise_request(predict, renderer.info(), req)


# ------------------------------------------------------------------------------------------- registry


def test_every_model_name_has_a_family_with_an_adapter_and_schedulers():
    from models.schedulers import SCHEDULERS

    assert tuple(SCHEDULERS) == spec.SCHEDULERS
    for name, fam in families.MODELS.items():
        f = family(name)
        assert f.name == fam and f.pipeline == families.FAMILIES[fam].pipeline
        assert set(families.FAMILIES[fam].schedulers) <= set(SCHEDULERS)
    assert family("sdxl").adapter.__name__ == "SDXLModel" and family("sd15").adapter.__name__ == "SDModel"


def test_each_family_spec_names_the_module_that_loads_it():
    """jobs.families (no torch) and models/ agree: each spec's module holds the FAMILY of its name, whose adapter
    runs a transformer exactly where the spec has a patch size (of the adapter's patches, where it fixes them),
    and names the transformer class that reads single files exactly where the spec says a single file holds the
    transformer alone (a class diffusers' single-file loader knows)."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    from models.base import Adapter

    assert set(families.MODELS.values()) == set(families.FAMILIES)
    for name, fam in families.FAMILIES.items():
        f = importlib.import_module(fam.module).FAMILY
        assert f is family(name) and f.name == name and f.spec is fam
        assert issubclass(f.adapter, Adapter) and f.adapter.denoiser == ("transformer" if fam.patch else "unet")
        assert getattr(f.adapter, "patch_size", fam.patch) == fam.patch, name
        assert fam.single_file in ("pipeline", "transformer", None)
        assert (fam.single_file is None) == bool(fam.folder_only), name
        assert bool(f.single_file_transformer) == (fam.single_file == "transformer"), name
        assert f.single_file_transformer is None or f.single_file_transformer in SINGLE_FILE_LOADABLE_CLASSES


@pytest.mark.parametrize("model", ["demo", "demo_random", "sd15", "sdxl"])
def test_each_model_config_group_composes(model):
    cfg = compose(f"model={model}")
    assert cfg.model.name == model and cfg.model.weights == "pretrained" and cfg.model.offload == "none"


def test_a_scheduler_of_another_family_is_refused_before_anything_runs(sdxl_dir):
    for cfg in (compose("job.scheduler=flow_euler"), sdxl_cfg(sdxl_dir, "job.scheduler=flow_euler")):
        with pytest.raises(ConfigError) as e:
            plan(cfg)
        assert e.value.field_name == "job.scheduler"
        assert str(e.value).startswith(f"job.scheduler='flow_euler': does not fit model={cfg.model.name}")


# ------------------------------------------------------------------------------------------------ SDXL


def test_sdxl_renders_a_multi_tile_image_through_the_renderer(sdxl_dir, tmp_path):
    cfg = sdxl_cfg(sdxl_dir, *SMALL, f"output.dir={tmp_path}", "job.negative_prompt=blurry")
    r = Renderer(cfg.model, cfg.output)
    assert type(r.model).__name__ == "SDXLModel" and r.model.weights_kind == "pretrained"
    assert (r.model.vae_scale_factor, r.model.vae.config.scaling_factor) == (8, pytest.approx(0.13025))
    assert_renders_small(r, cfg, sdxl_cfg(sdxl_dir, *SMALL, f"output.dir={tmp_path}", "job.seeds=[1]"), tmp_path)


def test_sdxl_renders_its_stages_as_crops_of_each_stage_canvas(sdxl_dir, tmp_path):
    cfg = sdxl_cfg(sdxl_dir, *SMALL, f"output.dir={tmp_path}", "job.base_size=64")
    r = Renderer(cfg.model, cfg.output)
    row = r.render(plan(cfg)[0])
    assert row["status"] == "ok", row["error"]
    assert row["stages"] == "80x56>128x88>196x130" and Image.open(tmp_path / row["path"]).size == (196, 130)


ONE_TILE = ["job.width=128", "job.height=128", "job.steps=3", "tiling.tile=16", "tiling.overlap=4", "tiling.method=uniform",
            "job.guidance=5.0", "job.seeds=[3]"]


@pytest.mark.parametrize("negative,scheduler", [("", "euler"), ("blurry, dark", "dpmpp_2m_karras")])
def test_sdxl_one_tile_equals_the_diffusers_pipeline(sdxl_dir, tmp_path, negative, scheduler):
    from diffusers import StableDiffusionXLPipeline

    from models.schedulers import make_scheduler

    cfg = sdxl_cfg(sdxl_dir, *ONE_TILE, f"job.scheduler={scheduler}", f"job.negative_prompt='{negative}'",
                   "job.prompt_template='archer style, {prompt}'", f"output.dir={tmp_path}")
    req = plan(cfg)[0]
    assert req.prompt == "archer style, a vast mountain lake at dawn, wallpaper"
    ours = render_latents(Renderer(cfg.model, cfg.output), req)

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator("cpu").manual_seed(req.seed))
    theirs = pipe(req.prompt, negative_prompt=negative or None, height=128, width=128, num_inference_steps=3,
                  guidance_scale=5.0, latents=noise, output_type="latent").images
    assert ours.shape == theirs.shape == (1, 4, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert ours.std() > 0.1
    vae = pipe.vae
    want = vae.decode(theirs / vae.config.scaling_factor).sample
    torch.testing.assert_close(Renderer(cfg.model, cfg.output).model.decode(ours), want, rtol=1e-4, atol=1e-4)


def test_sdxl_text_conditioning_follows_diffusers_encode_prompt(sdxl, sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, local_files_only=True, add_watermarker=False)
    emb, neg, pooled, neg_pooled = pipe.encode_prompt("a red fox", negative_prompt="fog", device="cpu")
    cond = sdxl.encode("a red fox", "fog")
    assert cond.embeds.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
    torch.testing.assert_close(cond.embeds, torch.cat([neg, emb]))
    torch.testing.assert_close(cond.pooled, torch.cat([neg_pooled, pooled]))
    empty = sdxl.encode("a red fox", "")  # force_zeros_for_empty_prompt: the unconditional half is zeros
    assert not empty.embeds[0].any() and not empty.pooled[0].any()
    torch.testing.assert_close(empty.embeds[1], emb[0])


def test_each_prompt_pair_is_encoded_once(sdxl):
    calls = []
    hooks = [e.register_forward_hook(lambda *a: calls.append(1)) for e in sdxl.text_encoders]
    try:
        a = sdxl.encode("a cat in the snow", "blurry")
        assert len(calls) == 4  # both encoders, prompt and negative
        assert sdxl.encode("a cat in the snow", "blurry") is a and len(calls) == 4
        sdxl.encode("a cat in the snow", "")
        assert len(calls) == 6  # the empty negative is zeros, not encoded
    finally:
        for h in hooks:
            h.remove()


def test_sdxl_time_ids_put_each_tile_in_the_whole_canvas(sdxl):
    ids = sdxl.time_ids([Tile(0, 0, 16, 16), Tile(4, 8, 16, 12)], (17, 25))
    assert ids.tolist() == [[136, 200, 0, 0, 128, 128], [136, 200, 32, 64, 128, 96]]
    x, cond = torch.randn(2, 4, 16, 16), sdxl.encode("a", "")
    t = torch.tensor(500)
    at_origin = sdxl.predict(x, t, cond, 5.0, [Tile(0, 0, 16, 16)] * 2, (16, 16))
    assert torch.equal(sdxl.predict(x, t, cond, 5.0), at_origin)  # no tiles: each is a whole canvas
    moved = sdxl.predict(x, t, cond, 5.0, [Tile(0, 0, 16, 16), Tile(4, 8, 16, 16)], (17, 25))
    assert not torch.allclose(moved, at_origin)  # the size conditioning reaches the UNet
    single = sdxl.predict(x[1:], t, cond, 5.0, [Tile(4, 8, 16, 16)], (17, 25))
    torch.testing.assert_close(single, moved[1:], rtol=1e-4, atol=1e-5)  # batching changes nothing
    no_cfg = sdxl.predict(x, t, cond, 1.0)
    assert no_cfg.shape == x.shape and not torch.allclose(no_cfg, at_origin)


def test_fp16_keeps_the_vae_in_fp32_when_it_asks_for_upcast(sdxl_dir):
    m = load_model(spec.ModelConfig(name="sdxl", path=sdxl_dir, dtype="fp16"))
    assert m.unet.dtype == torch.float16 and m.text_encoder_2.dtype == torch.float16
    assert m.vae.dtype == torch.float32
    img = m.decode(torch.randn(1, 4, 4, 4))
    assert img.dtype == torch.float32 and img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()


# ---------------------------------------------------------------------------------------------- SD 1.x


def test_sd_one_tile_equals_the_diffusers_pipeline(tmp_path):
    cfg = compose(*ONE_TILE, "job.negative_prompt=haze", f"output.dir={tmp_path}")
    req = plan(cfg)[0]
    ours = render_latents(Renderer(cfg.model, cfg.output), req)
    pipe = load_demo_pipeline(resolve_path(cfg.model))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator("cpu").manual_seed(req.seed))
    theirs = pipe(req.prompt, negative_prompt="haze", height=128, width=128, num_inference_steps=3,
                  guidance_scale=5.0, latents=noise, output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert ours.std() > 0.1


# --------------------------------------------------------------------------------------------- loading


def test_pickle_files_are_refused_unless_allowed(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    cfg = compose("model=sd15", f"model.path={ckpt}")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.field_name == "model.path" and "torch pickle" in str(e.value) and "allow_pickle" in str(e.value)
    with pytest.raises(ConfigError) as e:  # allowed, the file still needs its configs
        validate(compose("model=sd15", f"model.path={ckpt}", "model.allow_pickle=true"))
    assert e.value.field_name == "model.config"
    with pytest.raises(ConfigError, match="model.path="):  # the worker checks too
        load_model(cfg.model)

    folder = tmp_path / "bin-folder"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^model.path=.*unet hold only pickle weights"):
        validate(compose("model=sd15", f"model.path={folder}"))
    validate(compose("model=sd15", f"model.path={folder}", "model.allow_pickle=true"))


def test_bad_model_files_are_named(tmp_path, sdxl_dir):
    st = tmp_path / "model.safetensors"
    st.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^model.config=None: a single-file model.path needs a local diffusers"):
        validate(compose("model=sdxl", f"model.path={st}"))
    with pytest.raises(ConfigError, match=r"^model.path=.*holds a StableDiffusionXLPipeline, not a StableDiffusionPipeline"):
        validate(compose("model=sd15", f"model.path={sdxl_dir}"))
    with pytest.raises(ConfigError, match=r"^model.config=.*only for a single-file model.path"):
        validate(compose("model=sdxl", f"model.path={sdxl_dir}", f"model.config={sdxl_dir}"))
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^model.path=.*must be a diffusers folder .* or a .safetensors file"):
        validate(compose("model=sdxl", f"model.path={tmp_path / 'model.onnx'}"))


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_cpu_offload_leaves_the_kept_components_whole(mode):
    """`models.loading.place` under CPU offload, with the CPU standing in for the GPU: every component gets
    accelerate's hooks (`_hf_hook`; sequential: its weights wait on the meta device) but those left out of it, the
    VAE under sequential offload, which keeps real weights and no hook.  This guards `models.loading.cpu_offload`,
    the one place that sets diffusers' private `_exclude_from_cpu_offload` (checked against diffusers 0.42.1): it
    fails if diffusers stops reading that attribute."""
    from models.loading import place

    pipe = build_tiny_sdxl()
    place(pipe, family("sdxl"), spec.ModelConfig(name="sdxl", offload=mode), torch.device("cpu"), torch.float32)
    kept = {"vae"} if mode == "sequential" else set()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module, devices = getattr(pipe, name), {p.device.type for p in getattr(pipe, name).parameters()}
        assert hasattr(module, "_hf_hook") is (name not in kept), name
        assert devices == ({"meta"} if mode == "sequential" and name not in kept else {"cpu"}), (name, devices)


def test_options_that_need_a_gpu_or_a_package_fail_clearly_on_this_worker():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")
    with pytest.raises(ConfigError, match=r"^model.offload='model': CPU offload .* this worker has no GPU"):
        load_model(spec.ModelConfig(offload="model"))
    from diffusers.utils import is_xformers_available

    msg = "xformers is not installed here" if not is_xformers_available() else "xformers needs a GPU"
    with pytest.raises(ConfigError, match=rf"^model.attention='xformers': {msg}"):
        load_model(spec.ModelConfig(attention="xformers"))


def test_remote_code_families_need_trust(monkeypatch):
    monkeypatch.setitem(families.FAMILIES, "sd", dataclasses.replace(families.FAMILIES["sd"], remote_code=True))
    with pytest.raises(ConfigError, match=r"^model.trust_remote_code=False: model=demo_random runs code shipped"):
        validate(compose())
    validate(compose("model.trust_remote_code=true"))


def _ldm_unet(sd: dict, cfg) -> dict:
    """diffusers UNet keys -> the original (LDM) layout that from_single_file converts back from."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    L, n = cfg.layers_per_block, len(cfg.block_out_channels)
    pre = [("mid_block.attentions.0.", "middle_block.1."), ("mid_block.resnets.0.", "middle_block.0."),
           ("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(n):
        for j in range(L):
            b = (L + 1) * i + j + 1
            pre += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{b}.0."),
                    (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{b}.1.")]
        pre.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(L + 1) * (i + 1)}.0.op."))
        for j in range(L + 1):
            b = (L + 1) * i + j
            pre += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{b}.0."),
                    (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{b}.1.")]
        up_at = 2 if "CrossAttn" in cfg.up_block_types[i] else 1
        pre.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(L + 1) * i + L}.{up_at}."))
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
    top, out = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        dp, lp = next(p for p in pre if k.startswith(p[0]))
        rest = k[len(dp):]
        if ".resnets." in dp:
            for a, b in resnet:
                rest = rest.replace(a, b)
        out[lp + rest] = v
    return out


def _ldm_vae(sd: dict, cfg) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    n = len(cfg.block_out_channels)
    pre = []
    for part in ("encoder", "decoder"):
        pre += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.") for k in range(2)]
        pre.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    for i in range(n):
        pre += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
                (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    top, out = DIFFUSERS_TO_LDM_MAPPING["vae"], {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        dp, lp = next(p for p in pre if k.startswith(p[0]))
        rest = k[len(dp):].replace("conv_shortcut", "nin_shortcut")
        if "attentions" in dp:
            for a, b in attn:
                rest = rest.replace(a, b)
            if v.ndim == 2:
                v = v[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[lp + rest] = v
    return out


def test_a_single_safetensors_file_loads_with_a_local_config_folder(tmp_path):
    """The demo model written as one original-layout .safetensors file, its configs in a weightless folder."""
    from safetensors.torch import save_file

    demo_dir = resolve_path(spec.ModelConfig(name="demo_random"))
    ref = load_demo_pipeline(demo_dir)
    ckpt = {"model.diffusion_model." + k: v for k, v in _ldm_unet(ref.unet.state_dict(), ref.unet.config).items()}
    ckpt.update({"first_stage_model." + k: v for k, v in _ldm_vae(ref.vae.state_dict(), ref.vae.config).items()})
    ckpt.update({"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
                 for k, v in ref.text_encoder.state_dict().items()})
    path = tmp_path / "demo.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(path))
    configs = tmp_path / "configs"
    shutil.copytree(demo_dir, configs, ignore=shutil.ignore_patterns("*.safetensors"))  # configs, no weights

    cfg = compose("model=sd15", f"model.path={path}", f"model.config={configs}")
    validate(cfg)
    m = load_model(cfg.model)
    assert type(m).__name__ == "SDModel" and m.scheduler_config == dict(ref.scheduler.config)
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(m, name).state_dict(), getattr(ref, name).state_dict()
        assert got.keys() == want.keys(), name
        for k in want:
            torch.testing.assert_close(got[k].reshape(want[k].shape), want[k], msg=f"{name}.{k}")
    assert m.tokenizer("the cat").input_ids == ref.tokenizer("the cat").input_ids


def _ldm_sdxl_unet(sd: dict, cfg) -> dict:
    """An SDXL UNet in the original (SGM) layout: the SD layout plus `label_emb`, the added time/text embedding
    (transformer_layers_per_block needs nothing: each block's transformer_blocks.N keep their names)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    added = DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]
    out = _ldm_unet({k: v for k, v in sd.items() if k not in added}, cfg)
    out.update({added[k]: v for k, v in sd.items() if k in added})
    return out


def _open_clip(sd: dict) -> dict:
    """A CLIPTextModelWithProjection in OpenCLIP's layout (SDXL's second encoder, `conditioner.embedders.1.model.`):
    fused q/k/v `in_proj`, ln_1/ln_2, mlp.c_fc/c_proj, a bare positional_embedding, text_projection transposed."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias"),
           "text_projection": sd.pop("text_projection.weight").T}
    sd.pop("embeddings.position_ids", None)
    names = [("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."),
             ("self_attn.out_proj.", "attn.out_proj.")]
    for k in [k for k in sd if ".self_attn.q_proj." in k]:
        layer, kind = k.split(".self_attn.q_proj.")  # "encoder.layers.N", "weight" | "bias"
        qkv = [sd.pop(f"{layer}.self_attn.{x}_proj.{kind}") for x in "qkv"]
        out[f"transformer.resblocks.{layer.split('.')[-1]}.attn.in_proj_{kind}"] = torch.cat(qkv)
    for k, v in sd.items():
        assert k.startswith("encoder.layers."), k
        rest = k.removeprefix("encoder.layers.")
        for a, b in names:
            rest = rest.replace(a, b)
        out["transformer.resblocks." + rest] = v
    return out


def test_a_single_sdxl_safetensors_file_loads_with_a_local_config_folder(tmp_path):
    """A tiny SDXL written as one original-layout .safetensors file (as Civitai fine-tunes ship), its configs in a
    weightless folder.  The second encoder is wider than the first: diffusers tells SDXL's two CLIPs apart by
    width alone (CLIP-L 768, OpenCLIP bigG 1280), so equal widths would load the first into both."""
    from safetensors.torch import save_file

    ref = build_tiny_sdxl(width_2=48)
    ckpt = {"model.diffusion_model." + k: v for k, v in _ldm_sdxl_unet(ref.unet.state_dict(), ref.unet.config).items()}
    ckpt.update({"first_stage_model." + k: v for k, v in _ldm_vae(ref.vae.state_dict(), ref.vae.config).items()})
    ckpt.update({"conditioner.embedders.0.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
                 for k, v in ref.text_encoder.state_dict().items()})
    ckpt.update({"conditioner.embedders.1.model." + k: v for k, v in _open_clip(ref.text_encoder_2.state_dict()).items()})
    path = tmp_path / "tiny-sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(path))
    configs = tmp_path / "configs"
    ref.save_pretrained(configs, safe_serialization=True)
    for f in configs.rglob("*.safetensors"):  # configs and tokenizers, no weights
        f.unlink()
    for sub in ("tokenizer", "tokenizer_2"):
        _write_vocab_files(str(configs / sub))

    cfg = compose("model=sdxl", f"model.path={path}", f"model.config={configs}")
    validate(cfg)
    m = load_model(cfg.model)
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert type(m).__name__ == "SDXLModel" and public(m.scheduler_config) == public(ref.scheduler.config)
    assert m.vae.config.scaling_factor == pytest.approx(0.13025) and m.unet.config.cross_attention_dim == 80
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got, want = getattr(m, name).state_dict(), getattr(ref, name).state_dict()
        assert got.keys() == want.keys(), name
        for k in want:
            torch.testing.assert_close(got[k].reshape(want[k].shape), want[k], rtol=0, atol=0, msg=f"{name}.{k}")
    cond = m.encode("a red fox", "fog")
    assert cond.embeds.shape == (2, 77, 80) and cond.pooled.shape == (2, 32)


# ------------------------------------------------------------------------------------------ random weights


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_random_weights_build_the_full_size_architectures():
    """Built on the meta device: shapes and parameter counts without 13 GB of memory or minutes of init."""
    meta = torch.device("meta")
    sd = family("sd15").random_pipeline(meta, torch.float16)
    assert _count(sd.unet) == 859_520_964  # SD 1.5's UNet
    assert (_count(sd.vae), _count(sd.text_encoder)) == (83_653_863, 123_060_480)
    assert sd.unet.dtype == torch.float16 and sd.vae.config.scaling_factor == pytest.approx(0.18215)

    xl = family("sdxl").random_pipeline(meta, torch.bfloat16)
    assert _count(xl.unet) == 2_567_463_684  # SDXL base's UNet
    assert _count(xl.text_encoder_2) == 694_659_840 and _count(xl.text_encoder) == 123_060_480
    assert xl.unet.config.cross_attention_dim == 2048 and xl.vae.config.force_upcast
    assert xl.vae.config.scaling_factor == pytest.approx(0.13025)
    m = family("sdxl").adapter(xl, "sdxl", meta, torch.bfloat16, weights="random")  # the UNet/text widths agree
    assert (m.weights_kind, m.vae_scale_factor, m.latent_channels) == ("random", 8, 4)


def test_random_weights_load_through_load_model_and_are_marked(monkeypatch):
    """The whole load path with the SD 1.5 configs shrunk (full size takes 27 s to initialise on this CPU)."""
    import models.sd as sd

    monkeypatch.setattr(sd, "SD15_UNET", dict(sd.SD15_UNET, block_out_channels=(32, 32, 64, 64), attention_head_dim=2,
                                              norm_num_groups=8, layers_per_block=1, cross_attention_dim=32))
    monkeypatch.setattr(sd, "SD_VAE", dict(sd.SD_VAE, block_out_channels=(8, 8, 16, 16), norm_num_groups=8,
                                           layers_per_block=1))
    monkeypatch.setattr(sd, "CLIP_L_TEXT", dict(sd.CLIP_L_TEXT, hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=2, num_attention_heads=4, projection_dim=32))
    cfg = compose("model=sd15", "model.weights=random")
    a, b = load_model(cfg.model), load_model(cfg.model)
    assert a.weights_kind == "random" and a.name == "sd15"
    assert all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()))
    req = plan(cfg)[0]
    assert req.model == "sd15+random"  # the manifest's model column
    assert req.image_id != plan(compose("model=sd15", "model.weights=random", "job.prompt_template='x {prompt}'"))[0].image_id
    eps = a.predict(torch.randn(1, 4, 8, 8), torch.tensor(500), a.encode(req.prompt, ""), 7.0)
    assert eps.shape == (1, 4, 8, 8) and torch.isfinite(eps).all()


def test_random_weights_take_no_path_and_not_the_demo(tmp_path):
    with pytest.raises(ConfigError, match=r"^model.path=.*not used with model.weights=random"):
        validate(compose("model=sdxl", "model.weights=random", f"model.path={tmp_path}"))
    for demo in ("demo", "demo_random"):
        with pytest.raises(ConfigError, match=r"^model.weights='random': random builds a family's full-size "
                           r"architecture \(model=sd15 or sdxl.*\); the small random-weight demo is model=demo_random"):
            validate(compose(f"model={demo}", "model.weights=random"))
