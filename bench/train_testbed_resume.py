"""Continues the UNet training of a test-bed folder made by the test bed's train.py (../shared/testbed: the same
data recipe, loss and EMA), its VAE and text encoder kept as they are: train.py's recipe stretched over several
calls of the device tool's 10-minute limit. On the GPU machine (one H200: ~13 UNet steps a second):

    source .gpu/env.sh && python3 bench/train_testbed_resume.py tests/assets/scenes-sd-zoom /tmp/m --zoom \
        --unet-seconds 370          # then tar -C /tmp -cf - m | split -b 15M - $OUT/m.tar.
"""
import argparse, json, os, sys, time
import torch, torch.nn.functional as F
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "assets"))
from scenes import WORDS, scenes, count_suns
from diffusers import DDPMScheduler, StableDiffusionPipeline

ap = argparse.ArgumentParser(); ap.add_argument("inp"); ap.add_argument("out")
ap.add_argument("--unet-seconds", type=float, default=300); ap.add_argument("--zoom", action="store_true")
ap.add_argument("--lr", type=float, default=3e-4)
a = ap.parse_args()
dev = "cuda"; S = 256
torch.manual_seed(10); g = torch.Generator().manual_seed(11)
pipe = StableDiffusionPipeline.from_pretrained(a.inp, torch_dtype=torch.float32, safety_checker=None,
                                               requires_safety_checker=False).to(dev)
vae, te, tok, unet = pipe.vae.eval(), pipe.text_encoder.eval(), pipe.tokenizer, pipe.unet.train()
vae.requires_grad_(False); te.requires_grad_(False)
scale = vae.config.scaling_factor
auto = dict(device_type="cuda", dtype=torch.bfloat16)

def batch(n):
    words = [WORDS[i] for i in torch.randint(0, 3, (n,), generator=g)]
    if not a.zoom:
        return scenes(n, S, words, g, dev), words
    k = n // 3
    parts = [scenes(k, S, words[:k], g, dev), scenes(k, S, words[k:2 * k], g, dev, sun=(0.04, 0.35))]
    for i in range(2 * k, n, 8):
        j = min(i + 8, n)
        v = int(S * 2 ** (2 * float(torch.rand((), generator=g))))
        big = scenes(j - i, v, words[i:j], g, dev)
        for b in range(j - i):
            y0, x0 = (int(torch.randint(0, v - S + 1, (), generator=g)) for _ in range(2))
            parts.append(big[b:b + 1, :, y0:y0 + S, x0:x0 + S])
    return torch.cat(parts), words

ddpm = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
def embed(words):
    ids = tok(words, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(dev)
    with torch.no_grad(): return te(ids)[0]
texts = {w: embed([f"a {w} landscape"]) for w in WORDS}; texts[""] = embed([""])
ema = [p.detach().clone() for p in unet.parameters()]
opt = torch.optim.AdamW(unet.parameters(), a.lr, weight_decay=0.01)
B = 192
step, t0 = 0, time.time()
ac = ddpm.alphas_cumprod.to(dev)
pool_z, pool_w = [], []
with torch.no_grad(), torch.autocast(**auto):
    for _ in range(40000 // 256):
        x, words = batch(256)
        pool_z.append(vae.encode(x).latent_dist.sample().float() * scale); pool_w += [WORDS.index(w) for w in words]
pool_z, pool_w = torch.cat(pool_z), torch.tensor(pool_w, device=dev)
print(f"pool of {len(pool_z)} latents in {time.time()-t0:.0f}s", flush=True)
table = torch.cat([texts[w] for w in WORDS + ("",)])
t0 = time.time()
while time.time() - t0 < a.unet_seconds:
    idx = torch.randint(0, len(pool_z), (B,), device=dev)
    z0 = pool_z[idx]
    z0 = torch.where(torch.rand(B, 1, 1, 1, device=dev) < 0.5, z0.flip(-1), z0)
    wi = torch.where(torch.rand(B, device=dev) < 0.15, torch.full_like(pool_w[idx], 3), pool_w[idx])
    t = torch.randint(0, 1000, (B,), device=dev)
    n = torch.randn_like(z0)
    zt = ac[t].sqrt().view(-1, 1, 1, 1) * z0 + (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * n
    with torch.autocast(**auto):
        pred = unet(zt, t, table[wi]).sample
    loss = F.mse_loss(pred.float(), n)
    opt.zero_grad(set_to_none=True); loss.backward(); torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0); opt.step()
    with torch.no_grad(): torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 1 - 0.999)
    if step % 500 == 0: print(f"unet {step} mse {loss.item():.4f} {time.time()-t0:.0f}s", flush=True)
    step += 1
print(f"unet done: {step} more steps in {time.time()-t0:.0f}s", flush=True)
with torch.no_grad():
    for p, e in zip(unet.parameters(), ema): p.copy_(e)
unet.eval()
pipe.to(torch.float16).save_pretrained(a.out, safe_serialization=True)
pipe.to(torch.float32); pipe.set_progress_bar_config(disable=True)
res = {}
for w in WORDS:
    imgs = pipe([f"a {w} landscape"] * 8, height=S, width=S, num_inference_steps=30, guidance_scale=4.0,
                generator=torch.Generator(dev).manual_seed(0), output_type="pt").images
    res[w] = [count_suns(im * 2 - 1) for im in imgs]
print("suns per image", json.dumps(res), flush=True)
