"""Trains the Z-Image-layout sibling of the coherence test-bed model (train.py): a small `ZImagePipeline`
(ZImageTransformer2DModel with 2x2 patches, a 16-channel 8x AutoencoderKL with FLUX's scale *and* shift, a frozen
random Qwen3 text encoder over a byte tokenizer, FlowMatchEulerDiscreteScheduler with Z-Image-Turbo's static
shift 3.0) on the procedural scenes of scenes.py at 256 px, and saves it as a diffusers folder that
`ZImagePipeline.from_pretrained` (and Tessera's model=z_image) reads.

    python3 bench/train_zimage_testbed.py OUT [--vae-steps N] [--dit-seconds S] [--pool N] [--batch B] [--guidance G] [--steps N]
                            [--smoke]

On one H200 the defaults take about 8.5 minutes (VAE ~2.5, pool ~0.8, transformer 4.5, checks ~0.3).

Conventions, as ZImagePipeline (diffusers 0.42) samples:
* text: `pipe._encode_prompt` itself (Qwen chat markup with the generation prompt, padded to 512, the text
  encoder's hidden_states[-2], only the real tokens), computed once for the 3 prompts and "" and kept as a table;
* latents: z = (vae_latent - shift_factor) * scaling_factor, shift = mean, scale = 1 / std of trained latents;
* x_sigma = (1 - sigma) x0 + sigma noise; the transformer sees the time 1 - sigma (= (1000 - t) / 1000) and is
  trained to output x0 - noise: the pipeline negates it into noise - x0 = d x / d sigma, which is what
  FlowMatchEulerDiscreteScheduler.step (x += (sigma_next - sigma) * output) integrates;
* sigma for training: u ~ U(0, 1) shifted as the scheduler shifts its steps, sigma = 3u / (1 + 2u), i.e. the
  very distribution of sigmas a sampling run visits (a sampler's steps are the shifted linspace(1, 1/n, n));
* guidance: ZImagePipeline's guidance_scale g gives v_pos + g (v_pos - v_neg), off at g = 0; g = 3 here is
  SD's (and train.py's) guidance 4.  15% of training prompts are "" (the pipeline's default negative).
"""
import argparse, json, math, os, sys, time
import torch, torch.nn.functional as F
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "assets"))
from scenes import WORDS, scenes, count_suns
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

ap = argparse.ArgumentParser(); ap.add_argument("out")
ap.add_argument("--vae-steps", type=int, default=None, help="default 1200 (smoke: 10)")
ap.add_argument("--dit-seconds", type=float, default=None, help="transformer training time, default 270 (smoke: 5)")
ap.add_argument("--pool", type=int, default=None, help="pre-encoded scenes to train the transformer on (24576)")
ap.add_argument("--batch", type=int, default=None, help="transformer batch, default 256 (smoke: 4)")
ap.add_argument("--guidance", type=float, default=3.0, help="ZImagePipeline guidance_scale for the check samples")
ap.add_argument("--steps", type=int, default=None, help="sampling steps of the check, default 20 (smoke: 4)")
ap.add_argument("--smoke", action="store_true", help="64 px, a few steps: runs on a CPU in seconds")
a = ap.parse_args()
vae_steps = a.vae_steps if a.vae_steps is not None else (10 if a.smoke else 1200)
dit_seconds = a.dit_seconds if a.dit_seconds is not None else (5 if a.smoke else 270)
steps = a.steps if a.steps is not None else (4 if a.smoke else 20)
pool_n = a.pool if a.pool is not None else (64 if a.smoke else 24576)
dev = "cuda" if torch.cuda.is_available() else "cpu"
S = 64 if a.smoke else 256
torch.manual_seed(0); g = torch.Generator().manual_seed(1)
os.makedirs(a.out, exist_ok=True)
T00 = time.time()
if dev == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
MAX_LEN = 512  # ZImagePipeline's default max_sequence_length (Tessera's too)
SHIFT = 3.0    # Z-Image-Turbo's scheduler: shift 3.0, use_dynamic_shifting false


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.flow import CHAT_TEMPLATE, byte_tokenizer as _byte_tokenizer  # noqa: E402  Tessera's offline tokenizer


def byte_tokenizer():
    """A fast byte-level tokenizer (256 byte symbols + Qwen's chat specials, no merges), built offline, with Qwen's
    chat markup as ZImagePipeline applies it (add_generation_prompt=True, enable_thinking=True: no <think> block)."""
    return _byte_tokenizer(bos=False, model_max_length=MAX_LEN, chat_template=CHAT_TEMPLATE)


tok = byte_tokenizer()
te = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                            rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).to(dev).eval()
te.requires_grad_(False)
vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=32,
                    block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", mid_block_add_attention=True,
                    use_quant_conv=False, use_post_quant_conv=False, force_upcast=True, sample_size=S).to(dev)
# head_dim 64 = sum(axes_dims) (frame/caption axis, rows, cols); axes_lens as Z-Image (RoPE tables, no weights)
dit = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=256, n_layers=6,
                               n_refiner_layers=1, n_heads=4, n_kv_heads=4, norm_eps=1e-5, qk_norm=True,
                               cap_feat_dim=te.config.hidden_size, rope_theta=256.0, t_scale=1000.0,
                               axes_dims=[16, 24, 24], axes_lens=[1024, 512, 512]).to(dev)
with torch.no_grad():  # the output projection starts at zero (DiT's habit): the first steps predict 0 velocity
    fl = dit.all_final_layer["2-1"].linear; fl.weight.zero_(); fl.bias.zero_()
sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT, use_dynamic_shifting=False)
npar = lambda m: sum(p.numel() for p in m.parameters())
print("params vae %.2fM transformer %.2fM text_encoder %.3fM" % (npar(vae) / 1e6, npar(dit) / 1e6, npar(te) / 1e6),
      flush=True)
auto = dict(device_type="cuda", dtype=torch.bfloat16) if dev == "cuda" else dict(device_type="cpu", enabled=False)


def batch(n):
    words = [WORDS[i] for i in torch.randint(0, 3, (n,), generator=g)]
    return scenes(n, S, words, g, dev), words


# 1. the autoencoder: L1 + a light KL (as train.py), 16 latent channels, no quant convs (FLUX's layout)
opt = torch.optim.AdamW(vae.parameters(), 1e-3, weight_decay=0)
B = 4 if a.smoke else 32
t0 = time.time()
for step in range(vae_steps):
    x, _ = batch(B)
    with torch.autocast(**auto):
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
    loss = F.l1_loss(rec.float(), x) + 1e-6 * post.kl().mean()
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    for pg in opt.param_groups: pg["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / vae_steps))
    if step % 250 == 0: print(f"vae {step} l1 {loss.item():.4f} {time.time()-t0:.0f}s", flush=True)
vae.eval().requires_grad_(False)
with torch.no_grad():
    zs, rl = [], []
    for _ in range(1 if a.smoke else 4):
        x, _ = batch(8 if a.smoke else 64)
        zz = vae.encode(x).latent_dist.sample().float()
        zs.append(zz); rl.append(F.l1_loss(vae.decode(zz).sample.float(), x).item())
    zs = torch.cat(zs)
    shift_f, scale_f = float(zs.mean()), float(1 / zs.std())
print(f"vae done {time.time()-t0:.0f}s  rec l1 {sum(rl)/len(rl):.4f}  shift_factor {shift_f:.4f}  "
      f"scaling_factor {scale_f:.4f}  (per-channel means {zs.mean((0, 2, 3)).abs().max():.3f} max |.|)", flush=True)
vae.register_to_config(scaling_factor=scale_f, shift_factor=shift_f)

# 2. text conditioning exactly as ZImagePipeline.encode_prompt computes it, once per prompt, with the frozen encoder
pipe = ZImagePipeline(scheduler=sch, vae=vae, text_encoder=te, tokenizer=tok, transformer=dit)
PROMPTS = [f"a {w} landscape" for w in WORDS] + [""]
with torch.no_grad():
    table = [pipe._encode_prompt([p], device=dev, max_sequence_length=MAX_LEN)[0].float() for p in PROMPTS]
print("caption tokens per prompt", {p: len(e) for p, e in zip(PROMPTS, table)}, flush=True)

# 3. the pool: pre-encoded, normalised latents (as train.py), drawn from with flips
t0 = time.time()
pool_z, pool_w = [], []
with torch.no_grad(), torch.autocast(**auto):
    nb = 64 if a.smoke else 256
    for _ in range(max(1, pool_n // nb)):
        x, words = batch(nb)
        zz = vae.encode(x).latent_dist.sample().float()
        pool_z.append((zz - shift_f) * scale_f)
        pool_w += [WORDS.index(w) for w in words]
pool_z, pool_w = torch.cat(pool_z), torch.tensor(pool_w)
print(f"pool of {len(pool_z)} latents {tuple(pool_z.shape[1:])} in {time.time()-t0:.0f}s  "
      f"(mean {pool_z.float().mean():.3f} std {pool_z.float().std():.3f})", flush=True)


def velocity(model, zt, s, caps):
    """The transformer as ZImagePipeline calls it: a list of [16, 1, h, w] latents, the time s = 1 - sigma, a list of
    caption embeddings; returns the raw output [B, 16, h, w] (which the pipeline negates before scheduler.step)."""
    out = model(list(zt.unsqueeze(2).unbind(0)), s, caps, return_dict=False)[0]
    return torch.stack(out).squeeze(2)


_consts = {}


def velocity_batched(model, zt, s, ci):
    """The same computation as `velocity(model, zt, s, [table[i] for i in ci])`, batched for training speed: diffusers'
    forward patchifies, pads and embeds rope positions item by item in Python (4.3 steps/s at batch 128 on an H200;
    this: 11.8, and 10 at batch 256).  Here the image side is batched (all latents one size), each of the 4 captions is embedded and refined once per
    call (as in the module, a caption's refined tokens do not depend on the batch it is in), and the rope positions
    (constants) are cached.  Checked against `velocity` below, before training."""
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF
    Bn, C, H, W = zt.shape
    p, dev_ = 2, zt.device
    ht, wt = H // p, W // p
    n_img = ht * wt
    n_pad = (-n_img) % SEQ_MULTI_OF
    key = (ht, wt, str(dev_))
    if key not in _consts:  # positions exactly as the module's patchify_and_embed numbers them
        grid = lambda size, start: model.create_coordinate_grid(size=size, start=start, device=dev_).flatten(0, 2)
        Ls = [len(f) for f in table]
        Lps = [L + (-L) % SEQ_MULTI_OF for L in Ls]
        Lmax = max(Lps)
        zpad = lambda t: torch.cat([t, t.new_zeros(Lmax - len(t), *t.shape[1:])])
        # a padded caption is numbered 1..Lp (its pads included); the image (cap_len + 1, h, w), its pads (0, 0, 0)
        cfr = torch.stack([zpad(model.rope_embedder(grid((Lp, 1, 1), (1, 0, 0)))) for Lp in Lps])
        xfr = torch.stack([model.rope_embedder(torch.cat([grid((1, ht, wt), (Lp + 1, 0, 0)),
                                                          grid((1, 1, 1), (0, 0, 0)).repeat(n_pad, 1)])) for Lp in Lps])
        _consts[key] = dict(Ls=Ls, Lps=Lps, Lmax=Lmax, cfr=cfr, xfr=xfr,
                            lens=torch.tensor([n_img + n_pad + Lp for Lp in Lps], device=dev_),
                            ipad=torch.arange(n_img + n_pad, device=dev_) >= n_img)
    k_ = _consts[key]
    cit = torch.as_tensor(ci, device=dev_)
    adaln = model.t_embedder(s * model.t_scale).type_as(zt)
    # image tokens: (h, w, ph, pw, c) order of the module's _patchify_image (one frame, f_patch_size 1)
    x = zt.view(Bn, C, ht, p, wt, p).permute(0, 2, 4, 3, 5, 1).reshape(Bn, n_img, p * p * C)
    if n_pad:  # padded with the last patch repeated, whose embedding becomes x_pad_token
        x = torch.cat([x, x[:, -1:].expand(Bn, n_pad, x.shape[-1])], 1)
    x = model.all_x_embedder["2-1"](x)
    x = torch.where(k_["ipad"][None, :, None], model.x_pad_token, x)  # as the module (its dtype promotion included)
    xf = k_["xfr"][cit]
    for layer in model.noise_refiner:
        x = layer(x, None, xf, adaln)
    # captions: each padded to a multiple of 32 (its last token repeated, embedded, replaced by cap_pad_token), refined
    caps = []
    for f, L, Lp, fr in zip(table, k_["Ls"], k_["Lps"], k_["cfr"]):
        f = torch.cat([f, f[-1:].expand(Lp - L, -1)]) if Lp > L else f
        c = model.cap_embedder(f)
        c = torch.where((torch.arange(Lp, device=dev_) >= L)[:, None], model.cap_pad_token, c)[None]
        for layer in model.context_refiner:
            c = layer(c, None, fr[None, :Lp])
        caps.append(torch.cat([c[0], c.new_zeros(k_["Lmax"] - Lp, c.shape[-1])]))
    # unified sequence [image, caption], zero-padded at the end, masked where it is shorter than the whole
    u = torch.cat([x, torch.stack(caps)[cit].to(x.dtype)], 1)
    uf = torch.cat([xf, k_["cfr"][cit]], 1)
    lens = k_["lens"][cit]
    mask = None if (k_["lens"] == u.shape[1]).all() else torch.arange(u.shape[1], device=dev_)[None] < lens[:, None]
    for layer in model.layers:
        u = layer(u, mask, uf, adaln)
    u = model.all_final_layer["2-1"](u, c=adaln)[:, :n_img]
    return u.view(Bn, ht, wt, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(Bn, C, H, W)


torch.backends.cuda.matmul.allow_tf32 = False  # (the check in plain fp32; a wrong position or pad is ~4e-2 off)
with torch.no_grad():  # the batched forward against diffusers' own, fp32, with every caption and a mixed batch
    zc = torch.randn(5, 16, S // 8, S // 8, device=dev); sc = torch.rand(5, device=dev); cc = [0, 3, 1, 2, 3]
    saved = fl.weight.clone()
    fl.weight.normal_(0, 0.02)  # (the zero-initialised output would make the check vacuous)
    ref, got = velocity(dit, zc, sc, [table[i] for i in cc]), velocity_batched(dit, zc, sc, cc)
    fl.weight.copy_(saved)
    e = (ref - got).abs().max().item() / ref.abs().max().item()
    print(f"batched training forward vs ZImageTransformer2DModel.forward: max rel diff {e:.1e}", flush=True)
    assert e < 1e-3, e
torch.backends.cuda.matmul.allow_tf32 = dev == "cuda"


# 4. the transformer: rectified flow, target x0 - noise, 15% empty prompts (for guidance), EMA weights
ema = [p.detach().clone().float() for p in dit.parameters()]
LR = 3e-4
opt = torch.optim.AdamW(dit.parameters(), LR, betas=(0.9, 0.99), weight_decay=0.01)
B = a.batch or (4 if a.smoke else 256)
step, t0 = 0, time.time()
dit.train()
while time.time() - t0 < dit_seconds:
    idx = torch.randint(0, len(pool_z), (B,))
    z0 = pool_z[idx.to(pool_z.device)].float()
    z0 = torch.where(torch.rand(B, 1, 1, 1, device=dev) < 0.5, z0.flip(-1), z0)
    wi = torch.where(torch.rand(B) < 0.15, torch.full((B,), 3), pool_w[idx]).tolist()
    u = torch.rand(B, device=dev)
    sigma = SHIFT * u / (1 + (SHIFT - 1) * u)  # the scheduler's static shift of a uniform step position
    n = torch.randn_like(z0)
    zt = (1 - sigma).view(-1, 1, 1, 1) * z0 + sigma.view(-1, 1, 1, 1) * n
    with torch.autocast(**auto):
        pred = velocity_batched(dit, zt, 1 - sigma, wi)
    loss = F.mse_loss(pred.float(), z0 - n)
    frac = (time.time() - t0) / dit_seconds
    for pg in opt.param_groups:  # short warmup, then cosine to 10% over the time budget
        pg["lr"] = LR * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
    opt.zero_grad(set_to_none=True); loss.backward(); torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0); opt.step()
    d = min(0.999, (1 + step) / (10 + step))
    with torch.no_grad(): torch._foreach_lerp_(ema, [p.detach().float() for p in dit.parameters()], 1 - d)
    if step % 500 == 0: print(f"dit {step} mse {loss.item():.4f} {time.time()-t0:.0f}s", flush=True)
    step += 1
print(f"dit done: {step} steps of {B} in {time.time()-t0:.0f}s ({step / (time.time()-t0):.1f} steps/s)", flush=True)
dit.eval().requires_grad_(False)
with torch.no_grad():
    for p, e in zip(dit.parameters(), ema): p.copy_(e)
del pool_z, opt, ema
if dev == "cuda": torch.cuda.empty_cache()

# 5. save (transformer and VAE in bf16, the tiny text encoder in fp32 so reloaded embeddings equal the table)
dit.to(torch.bfloat16); vae.to(torch.bfloat16); te.to(torch.float32)
pipe.save_pretrained(a.out, safe_serialization=True)
size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(a.out) for f in fs)
print(f"saved {a.out}: {size / 2**20:.1f} MiB", flush=True)
del pipe, dit, vae, te

# 6. load it back as any user would and sample with the pipeline's own loop
pipe = ZImagePipeline.from_pretrained(a.out, local_files_only=True)
pipe.to(dev, torch.float32); pipe.set_progress_bar_config(disable=True)
with torch.no_grad():
    err = max((pipe._encode_prompt([p], device=dev)[0].float() - e).abs().max().item() for p, e in zip(PROMPTS, table))
print(f"reloaded: scheduler shift {pipe.scheduler.config.shift} dynamic {pipe.scheduler.config.use_dynamic_shifting}, "
      f"vae scale {pipe.vae.config.scaling_factor:.4f} shift {pipe.vae.config.shift_factor:.4f}, "
      f"text embeddings vs training table max |diff| {err:.2e}", flush=True)
with torch.no_grad():
    x, _ = batch(8 if a.smoke else 32)
    rt = F.l1_loss(pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample, x).item()
print(f"reloaded vae round trip l1 {rt:.4f} (fp32, posterior mode)", flush=True)
res, rows = {}, []
for w in WORDS:
    imgs = pipe([f"a {w} landscape"] * 8, height=S, width=S, num_inference_steps=steps, guidance_scale=a.guidance,
                generator=torch.Generator(dev).manual_seed(0), output_type="pt").images
    res[w] = [count_suns(im * 2 - 1) for im in imgs]
    rows.append(torch.cat(list(imgs), dim=2))
# the plain pipeline on a whole canvas 4x wider than trained: the duplication a tiled render also shows
wide = pipe(["a dusk landscape"] * 2, height=S, width=4 * S, num_inference_steps=steps, guidance_scale=a.guidance,
            generator=torch.Generator(dev).manual_seed(0), output_type="pt").images
res["wide_4x"] = [count_suns(im * 2 - 1) for im in wide]
from PIL import Image
grid = torch.cat(rows + [torch.cat(list(wide), dim=2)], dim=1)  # rows: dusk, day, night (8 each), 2 wide dusk
png = os.path.join(os.path.dirname(os.path.abspath(a.out)), "samples.png")
Image.fromarray((grid.permute(1, 2, 0) * 255).round().clamp(0, 255).byte().cpu().numpy()).save(png)
print(f"samples grid {png}; total {time.time()-T00:.0f}s", flush=True)
print("suns per image", json.dumps(res), flush=True)
