"""NewBie-image: its transformer variant, the remote-code refusal, loading, the tiled render, and agreement with an
independent reference of how NewBie's official code calls the model.

A tiny NewBie diffusers folder is built in code: the NewBie transformer (32 wide), Gemma 3 text (32 wide), a FLUX-style
VAE, byte-level tokenizers, and for `text_encoder_2` a tiny Jina-CLIP stand-in shipped as remote code (config.json
with an `auto_map` to a modeling file written here), exposing Jina CLIP's text API (`get_text_features(input_ids=...)`
taking ids or a BatchEncoding, mean-pooled over the non-pad tokens).  Everything loads back through `load_model`.

The equality checks, and what they prove:

* `test_the_transformer_is_lumina2_with_the_published_adaln_input`: NewbieTransformer2DModel equals diffusers' own
  Lumina2Transformer2DModel (same weights) whose timestep embedding is replaced, through a forward hook, by
  `time_text_embed([t_emb, clip_text_pooled_proj(pooled)])` written here from NewBie's models/model.py
  (`NextDiT_CLIP.forward`), on a batch whose captions differ in length.  So the variant is Lumina 2 plus exactly the
  published conditioning, with the published layer names.  `test_the_forward_walks_diffusers_lumina2_forward_to_the_bit`
  holds the forward's walk over Lumina 2's modules to diffusers' own forward, bit for bit.
* `test_one_tile_equals_the_official_sampling_loop`: for a canvas of one tile, Tessera's tiled render equals a plain
  loop written here from NewBie's demo.py: its `encode_prompt` (Gemma's penultimate layer of the system-prompted
  texts padded to a multiple of 8, Jina's pooled features of the raw texts), `forward_with_cfg` at the demo's
  defaults (CFG while t < 0.25, then the text prediction alone; no renormalisation) and the Lumina transport's
  fixed-grid Euler ODE (t = linspace(0, 1, steps + 1) time-shifted by 6, t = 0 noise, x += dt v).  So the adapter
  encodes, guides and steps as the official code does, given the same transformer.  It cannot prove the real
  weights' numbers (no real Gemma 3 / Jina CLIP / NewBie weights here) nor the demo's default midpoint solver.
"""
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F

from cluster.renderer import Renderer
from conftest import SMALL, assert_renders_small, compose
from jobs import ConfigError, plan, validate
from jobs import families
from models import family, load_model
from models.flow import byte_tokenizer
from models.newbie import NewbieModel, NewbiePipeline, NewbieTransformer2DModel
from test_dit import tiny_flux_vae
from tiling.render import denoise_request

pytestmark = pytest.mark.usefixtures("one_thread")

# finetune.py's system prompt for plain prompts, as NewBie trained with it (written out, not imported).
SYSTEM = ("You are an assistant designed to generate high-quality anime images with the highest degree of "
          "image-text alignment based on textual prompts. <Prompt Start> ")
TINY_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, hidden_size=32, num_layers=2,
                        num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                        axes_dim_rope=(8, 4, 4), axes_lens=(1024, 64, 64), cap_feat_dim=32)
CLIP_DIM = 24

JINA_CONFIG = '''
from transformers import PretrainedConfig


class TinyJinaConfig(PretrainedConfig):
    model_type = "tiny_jina_clip"

    def __init__(self, vocab_size=300, hidden_size=16, embed_dim=24, return_sequence=False, pad_token_id=0, **kwargs):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size, self.hidden_size, self.embed_dim = vocab_size, hidden_size, embed_dim
        self.return_sequence = return_sequence
'''
JINA_MODELING = '''
import torch
from torch import nn
from transformers import BatchEncoding, PreTrainedModel

from .configuration_tiny_jina import TinyJinaConfig


class TinyJinaTextModel(PreTrainedModel):
    """Jina CLIP v2's text API in miniature: ids (or a BatchEncoding) in, features mean-pooled over the tokens that
    are not padding (Jina's text tower takes its mask from the pad id), projected; with return_sequence, the
    (pooled, sequence) pair that NewBie's demo.py unpacks."""

    config_class = TinyJinaConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.mix = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.embed_dim)
        self.post_init()

    def get_text_features(self, input_ids=None, *args, **kwargs):
        ids = input_ids.input_ids if isinstance(input_ids, BatchEncoding) else input_ids
        keep = (ids != self.config.pad_token_id).to(self.embed.weight.dtype)[..., None]
        sequence = torch.tanh(self.mix(self.embed(ids)))
        pooled = self.proj((sequence * keep).sum(1) / keep.sum(1))
        return (pooled, sequence) if self.config.return_sequence else pooled
'''


@pytest.fixture(scope="module")
def modules_cache(tmp_path_factory):
    """Remote code is copied into transformers' modules cache: a temporary one, not the user's ~/.cache."""
    import transformers.dynamic_module_utils as dmu

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
        yield


@pytest.fixture(scope="module")
def newbie_dir(tmp_path_factory, modules_cache):
    """A NewBie diffusers folder laid out as the released one: transformer, text_encoder (Gemma 3), tokenizer,
    text_encoder_2 (remote code), tokenizer_2, vae, scheduler, and model_index.json naming NewbiePipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoConfig, AutoModel, Gemma3TextConfig, Gemma3TextModel

    path = tmp_path_factory.mktemp("weights") / "tiny-newbie"
    tok = byte_tokenizer(bos=True, model_max_length=512)
    tok2 = byte_tokenizer(bos=True, model_max_length=2048)  # as XLM-R's, never empty
    jina = path / "text_encoder_2"
    jina.mkdir(parents=True)
    (jina / "configuration_tiny_jina.py").write_text(textwrap.dedent(JINA_CONFIG))
    (jina / "modeling_tiny_jina.py").write_text(textwrap.dedent(JINA_MODELING))
    (jina / "config.json").write_text(json.dumps({
        "model_type": "tiny_jina_clip", "vocab_size": len(tok2), "hidden_size": 16, "embed_dim": CLIP_DIM,
        "pad_token_id": tok2.pad_token_id, "architectures": ["TinyJinaTextModel"],
        "auto_map": {"AutoConfig": "configuration_tiny_jina.TinyJinaConfig",
                     "AutoModel": "modeling_tiny_jina.TinyJinaTextModel"}}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = NewbieTransformer2DModel(**TINY_TRANSFORMER, clip_text_dim=CLIP_DIM)
        vae = tiny_flux_vae()
        gemma = Gemma3TextModel(Gemma3TextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
        clip = AutoModel.from_config(AutoConfig.from_pretrained(jina, trust_remote_code=True), trust_remote_code=True)
    transformer.save_pretrained(path / "transformer")
    vae.save_pretrained(path / "vae")
    FlowMatchEulerDiscreteScheduler(shift=6.0).save_pretrained(path / "scheduler")
    gemma.save_pretrained(path / "text_encoder")
    tok.save_pretrained(path / "tokenizer")
    clip.save_pretrained(jina)
    tok2.save_pretrained(path / "tokenizer_2")
    # The component entries as the NewbiePipeline pull request registers them; Tessera reads only _class_name.
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "NewbiePipeline", "_diffusers_version": "0.36.0.dev0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Gemma3TextModel"], "text_encoder_2": ["transformers", "AutoModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "Lumina2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    return str(path)


def cfg_of(path, *overrides, trust=True):
    return compose("model=newbie", f"model.path={path}", f"model.trust_remote_code={str(trust).lower()}",
                   "job.scheduler=flow_euler", *overrides)


@pytest.fixture(scope="module")
def model(newbie_dir):
    return load_model(cfg_of(newbie_dir).model)


# ------------------------------------------------------------------------------------- registry, refusal


def test_newbie_is_registered_and_its_config_composes(newbie_dir):
    f = family("newbie")
    newbie, remote_code = families.FAMILIES["newbie"], tuple(n for n, s in families.FAMILIES.items() if s.remote_code)
    assert f.name == families.MODELS["newbie"] and f.adapter is NewbieModel and f.pipeline_class is NewbiePipeline
    assert newbie.pipeline == "NewbiePipeline" and newbie.patch == 2
    assert newbie.schedulers == ("flow_euler",) and remote_code == ("newbie",)
    cfg = compose("model=newbie")
    assert cfg.model.name == "newbie" and cfg.model.trust_remote_code is False  # never by default
    with pytest.raises(ConfigError, match=r"^job.scheduler='euler': does not fit model=newbie"):
        validate(cfg_of(newbie_dir, "job.scheduler=euler"))
    validate(compose("model=newbie", "model.weights=random"))  # built in code: no shipped code runs


def test_shipped_code_is_refused_without_trust_remote_code(newbie_dir):
    why = ("model.trust_remote_code=False: model=newbie runs code shipped with its weights; set it to true only for "
           "weights you trust")
    cfg = cfg_of(newbie_dir, trust=False)
    for check in (lambda: validate(cfg), lambda: load_model(cfg.model)):
        with pytest.raises(ConfigError) as e:
            check()
        assert e.value.field_name == "model.trust_remote_code" and str(e.value) == why
    with pytest.raises(ConfigError, match=r"^model.trust_remote_code=False: NewBie's text_encoder_2 \(Jina CLIP v2\)"):
        NewbiePipeline.from_pretrained(newbie_dir)


def test_the_real_loader_runs_the_shipped_text_encoder(model):
    assert isinstance(model, NewbieModel) and model.weights_kind == "pretrained"
    assert type(model.text_encoder_2).__name__ == "TinyJinaTextModel"
    assert type(model.text_encoder_2).__module__.startswith("transformers_modules.")  # the folder's own code
    assert type(model.transformer) is NewbieTransformer2DModel and model.transformer.config.clip_text_dim == CLIP_DIM
    assert (model.patch_size, model.latent_channels, model.vae_scale_factor) == (2, 16, 8)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_random_weights_build_the_full_size_architecture():
    """On the meta device: NewBie-image Exp0.1's sizes without 16 GB of memory."""
    meta = torch.device("meta")
    pipe = family("newbie").random_pipeline(meta, torch.bfloat16)
    assert 3.4e9 < _count(pipe.transformer) < 3.6e9  # "a 3.5B parameter DiT" (README)
    assert 3.8e9 < _count(pipe.text_encoder) < 4.0e9  # Gemma3-4B-it's language model
    assert 0.5e9 < _count(pipe.text_encoder_2) < 0.6e9  # the stand-in, Jina CLIP v2's text tower's size
    assert pipe.transformer.config.cap_feat_dim == pipe.text_encoder.config.hidden_size == 2560
    assert pipe.transformer.config.clip_text_dim == 1024 and pipe.transformer.config.num_layers == 36
    m = family("newbie").adapter(pipe, "newbie", meta, torch.bfloat16, weights="random")
    assert (m.patch_size, m.latent_channels, m.weights_kind) == (2, 16, "random")


# ------------------------------------------------------------------------------------ the transformer


def released_state_dict():
    """diffusers' Lumina 2 names for everything Lumina 2 has, plus NewBie's published extras
    (models/model.py: `clip_text_pooled_proj` = RMSNorm + Linear, `time_text_embed` = SiLU + Linear)."""
    from diffusers import Lumina2Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        sd = Lumina2Transformer2DModel(**TINY_TRANSFORMER).state_dict()
        t_dim = min(TINY_TRANSFORMER["hidden_size"], 1024)
        sd.update({"clip_text_pooled_proj.0.weight": 1 + 0.1 * torch.randn(CLIP_DIM),
                   "clip_text_pooled_proj.1.weight": torch.randn(CLIP_DIM, CLIP_DIM) / 5,
                   "clip_text_pooled_proj.1.bias": torch.randn(CLIP_DIM) / 5,
                   "time_text_embed.1.weight": torch.randn(t_dim, t_dim + CLIP_DIM) / 7,
                   "time_text_embed.1.bias": torch.randn(t_dim) / 7})
    return sd


def test_released_key_names_load_strictly(tmp_path):
    """A transformer folder as released (config naming diffusers' class, no `clip_text_dim`) loads with every key
    matched: none missing, none unexpected, every tensor as saved."""
    from diffusers import Lumina2Transformer2DModel
    from safetensors.torch import save_file

    sd = released_state_dict()
    config = dict(Lumina2Transformer2DModel(**TINY_TRANSFORMER).config, _class_name="Lumina2Transformer2DModel")
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "diffusion_pytorch_model.safetensors")
    model, info = NewbieTransformer2DModel.from_pretrained(tmp_path, clip_text_dim=CLIP_DIM, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert set(model.state_dict()) == set(sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    model.load_state_dict(sd, strict=True)


def test_the_transformer_is_lumina2_with_the_published_adaln_input():
    from diffusers import Lumina2Transformer2DModel

    sd = released_state_dict()
    ours = NewbieTransformer2DModel(**TINY_TRANSFORMER, clip_text_dim=CLIP_DIM).eval()
    ours.load_state_dict(sd, strict=True)
    ref = Lumina2Transformer2DModel(**TINY_TRANSFORMER).eval()
    ref.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("clip_text_pooled_proj", "time_text_embed"))},
                        strict=True)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 8, 12, generator=g), torch.tensor([0.2, 0.7])
    text, pooled = torch.randn(2, 7, 32, generator=g), torch.randn(2, CLIP_DIM, generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)  # unequal captions: the padded path

    def newbie_adaln(module, args, out):
        """NextDiT_CLIP.forward: adaln_input = time_text_embed(cat([t_emb, clip_text_pooled_proj(pooled)]))."""
        t_emb, caption = out
        norm = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6) * sd["clip_text_pooled_proj.0.weight"]
        clip = F.linear(norm, sd["clip_text_pooled_proj.1.weight"], sd["clip_text_pooled_proj.1.bias"])
        return F.linear(F.silu(torch.cat([t_emb, clip], -1)), sd["time_text_embed.1.weight"],
                        sd["time_text_embed.1.bias"]), caption

    ref.time_caption_embed.register_forward_hook(newbie_adaln)
    with torch.no_grad():
        got = ours(x, t, text, mask, pooled, return_dict=False)[0]
        want = ref(x, t, text, mask, return_dict=False)[0]
        other = ours(x, t, text, mask, torch.randn(2, CLIP_DIM, generator=g)).sample
    assert got.shape == (2, 16, 8, 12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (other - got).abs().mean() > 1e-2  # the pooled text moves the prediction


@pytest.mark.parametrize("caption", [4, 7])
def test_the_forward_walks_diffusers_lumina2_forward_to_the_bit(caption):
    """NewbieTransformer2DModel.forward re-walks Lumina2Transformer2DModel's modules (checked against diffusers
    0.42.1).  Diffusers' own forward, run on the same module with the adaLN input NewBie computes from the same
    layers (a hook on `time_caption_embed`), gives the same output to the bit: captions of unequal lengths (the
    masked joint path) and of equal ones (no mask).  A diffusers release whose Lumina 2 forward walks otherwise
    fails here."""
    from diffusers import Lumina2Transformer2DModel

    ours = NewbieTransformer2DModel(**TINY_TRANSFORMER, clip_text_dim=CLIP_DIM).eval()
    ours.load_state_dict(released_state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 16, 8, 12, generator=g), torch.tensor([0.3, 0.9])
    text, pooled = torch.randn(2, 7, 32, generator=g), torch.randn(2, CLIP_DIM, generator=g)
    mask = torch.tensor([[1] * 7, [1] * caption + [0] * (7 - caption)], dtype=torch.bool)

    def newbie_adaln(module, args, out):
        t_emb, text_emb = out
        return ours.time_text_embed(torch.cat([t_emb, ours.clip_text_pooled_proj(pooled)], dim=-1)), text_emb

    hook = ours.time_caption_embed.register_forward_hook(newbie_adaln)
    try:
        with torch.no_grad():
            want = Lumina2Transformer2DModel.forward(ours, x, t, text, mask, return_dict=False)[0]
    finally:
        hook.remove()
    with torch.no_grad():
        got = ours(x, t, text, mask, pooled, return_dict=False)[0]
    assert got.shape == want.shape == (2, 16, 8, 12)
    assert torch.equal(got, want), (got - want).abs().max()


def test_jina_clip_stays_out_of_cpu_offload(newbie_dir):
    """`model.offload=model` (the CPU standing in for the GPU): Gemma, the transformer and the VAE get accelerate's
    hooks, Jina CLIP (`FAMILY.offload_keep`) none, since its text features come from `get_text_features`, which the
    hooks do not wrap."""
    from models.loading import place

    pipe = NewbiePipeline.from_pretrained(newbie_dir, trust_remote_code=True)
    place(pipe, family("newbie"), cfg_of(newbie_dir, "model.offload=model").model, torch.device("cpu"), torch.float32)
    names = ("text_encoder", "transformer", "vae", "text_encoder_2")
    hooked = {n: hasattr(getattr(pipe, n), "_hf_hook") for n in names}
    assert hooked == {"text_encoder": True, "transformer": True, "vae": True, "text_encoder_2": False}


# ---------------------------------------------------------------------------------- text conditioning


def official_encode(folder, prompt: str, negative: str):
    """demo.py's encode_prompt for [prompt, negative] (rows in that order): Gemma reads the system-prompted texts
    (a non-empty negative behind the system prompt too), padded to a multiple of 8, and gives its penultimate
    hidden states; Jina CLIP reads the raw texts as one padded BatchEncoding."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(f"{folder}/tokenizer")
    tok.padding_side = "right"
    gemma = AutoModel.from_pretrained(f"{folder}/text_encoder").eval()
    clip_tok = AutoTokenizer.from_pretrained(f"{folder}/tokenizer_2")
    clip = AutoModel.from_pretrained(f"{folder}/text_encoder_2", trust_remote_code=True).eval()
    with torch.no_grad():
        t = tok([SYSTEM + prompt, SYSTEM + negative if negative else ""], padding=True, pad_to_multiple_of=8,
                max_length=512, truncation=True, return_tensors="pt")
        out = gemma(input_ids=t.input_ids, attention_mask=t.attention_mask, output_hidden_states=True)
        feats = out.hidden_states[-2]
        c = clip_tok([prompt, negative], padding=True, truncation=True, max_length=2048, return_tensors="pt")
        pooled = clip.get_text_features(input_ids=c)
    return feats, t.attention_mask, pooled


def test_text_conditioning_follows_the_official_encode(newbie_dir, model):
    cond = model.encode("a red fox", "fog")
    feats, mask, pooled = official_encode(newbie_dir, "a red fox", "fog")
    for row, ref in ((1, 0), (0, 1)):  # Tessera: negative then prompt; demo.py: prompt then negative
        real = mask[ref].bool()
        assert cond.text.mask[row, :real.sum()].all() and cond.text.mask[row].sum() == real.sum()
        torch.testing.assert_close(cond.text.embeds[row, :real.sum()], feats[ref][real], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cond.pooled[row], pooled[ref], rtol=1e-5, atol=1e-6)
    assert cond.text.mask.shape == (2, 512) and cond.pooled.shape == (2, CLIP_DIM)
    assert model.encode("a red fox", "fog") is cond  # encoded once, then kept
    empty = model.encode("a red fox", "")  # an empty negative is "" for Gemma (no system prompt) and for Jina
    assert empty.text.mask[0].sum() == 1 and torch.equal(empty.text.mask[1], cond.text.mask[1])


def test_the_pooled_text_is_read_from_either_jina_api(model):
    """Jina's code returns the pooled features; demo.py unpacks (pooled, sequence): both give the same."""
    plain = model._pooled("a red fox")
    model.text_encoder_2.config.return_sequence = True
    try:
        torch.testing.assert_close(model._pooled("a red fox"), plain)
    finally:
        model.text_encoder_2.config.return_sequence = False


# ------------------------------------------------------------------------------- agreement, renders

ONE_TILE = ["job.width=128", "job.height=128", "job.steps=4", "tiling.tile=16", "tiling.overlap=4",
            "tiling.method=uniform", "job.seeds=[3]"]


def render_latents(renderer: Renderer, req) -> torch.Tensor:
    def predict(batches, t):
        return [renderer.predict(b, t, req.prompt, req.negative_prompt, req.guidance) for b in batches]

    return denoise_request(predict, renderer.info(), req)


def official_sample(transformer, z, feats, mask, pooled, steps: int, cfg: float, shift: float = 6.0,
                    cfg_trunc: float = 0.25):
    """demo.py's sampler at its defaults with the Euler solver: the Lumina transport's grid t = linspace(0, 1,
    steps + 1) shifted by t / (t + shift - shift t), x += (t' - t) v, v = forward_with_cfg(x, t): rows [prompt,
    negative], CFG while t < cfg_trunc, the prompt row alone after, no renormalisation."""
    t = torch.linspace(0, 1, steps + 1)
    t = t / (t + shift - shift * t)
    x = z
    with torch.no_grad():
        for i in range(steps):
            if t[i] < cfg_trunc:
                out = transformer(torch.cat([x, x]), t[i].expand(2), feats, mask, pooled).sample
                cond, uncond = out.chunk(2)
                v = uncond + cfg * (cond - uncond)
            else:
                v = transformer(x, t[i].expand(1), feats[:1], mask[:1], pooled[:1]).sample
            x = x + (t[i + 1] - t[i]) * v
    return x


@pytest.mark.parametrize("guidance,negative", [(4.0, "blurry, dark"), (1.0, "")])
def test_one_tile_equals_the_official_sampling_loop(newbie_dir, tmp_path, guidance, negative):
    cfg = cfg_of(newbie_dir, *ONE_TILE, f"job.guidance={guidance}", f"job.negative_prompt='{negative}'",
                 f"output.dir={tmp_path}")
    req = plan(cfg)[0]
    r = Renderer(cfg.model, cfg.output)
    ours = render_latents(r, req)

    transformer = NewbieTransformer2DModel.from_pretrained(newbie_dir, subfolder="transformer").eval()
    feats, mask, pooled = official_encode(newbie_dir, req.prompt, negative)
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator("cpu").manual_seed(req.seed))
    theirs = official_sample(transformer, noise, feats, mask.bool(), pooled, steps=4, cfg=guidance)
    assert ours.shape == theirs.shape == (1, 16, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert (ours - noise).abs().mean() > 0.05  # the model moved the latents
    vae = r.model.vae  # demo.py's decode: samples / 0.3611 + 0.1159
    torch.testing.assert_close(r.model.decode(ours), vae.decode(theirs / 0.3611 + 0.1159).sample, rtol=1e-4, atol=1e-4)


def test_the_guidance_window_is_the_official_one(model):
    """CFG before the normalised time 0.25 (a guided call differs from the unguided one), the text alone after."""
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = model.encode("a red fox", "fog")
    early, late = torch.tensor(900.0), torch.tensor(700.0)  # s = 0.1, 0.3
    assert not torch.allclose(model.predict(x, early, cond, 4.0), model.predict(x, early, cond, 1.0))
    torch.testing.assert_close(model.predict(x, late, cond, 4.0), model.predict(x, late, cond, 1.0))


def test_renders_a_multi_tile_image_through_the_renderer(newbie_dir, tmp_path):
    args = (*SMALL, f"output.dir={tmp_path}", "job.guidance=3.0", "job.negative_prompt=haze")
    cfg = cfg_of(newbie_dir, *args)
    r = Renderer(cfg.model, cfg.output)
    assert r.info().patch_size == 2 and r.model.latent_channels == 16
    assert_renders_small(r, cfg, cfg_of(newbie_dir, *args, "job.seeds=[1]"), tmp_path)
