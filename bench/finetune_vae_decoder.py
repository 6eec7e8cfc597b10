"""Fine-tunes the demo model's VAE decoder on what the progressive stages and region prompts hand it, the encoder
frozen: the latent space stays the one the UNet was trained in, as Stability's sd-vae-ft-mse did for SD 1.x
(decoder only, "a drop-in replacement"). Saves a diffusers VAE folder (fp16 safetensors, as models/scenes-sd/vae)
for `model.vae=FOLDER`, and a report of checks.

    python3 bench/finetune_vae_decoder.py OUT [--vae models/scenes-sd/vae] [--seconds S] [--batch B] [--lr LR]
                                          [--report PATH] [--smoke]

Why: the demo VAE (train.py's, trained on 256-px scenes whose suns are at most 22 px across and whose palette is one
per picture) breaks what it never saw. Given the encoder's latents of day scenes drawn sharp with suns 1.83x and 3.35x
the trained ones (what one and two stages' enlargements make of a sun), its decoder gives back one sun in 12 and 4 of
24 (the rest cut in 2 to 9 bright pieces, or dimmed below a sun's brightness), and a picture of three palettes side
by side comes back with its night third painted dusk (the checks below; BENCHMARKS.md "The demo VAE's decoder").
The stages' round trips and the final decode of a 4K picture go through that decoder with suns ten times larger.

Training pictures (targets are the pictures themselves, not the old decoder's output), a fifth each, at --size px:
scenes as train.py draws them; scenes with suns up to 35% of the frame; crops of scenes drawn up to 4x larger;
crops enlarged 1.5-4x by bicubic (the smooth content the stages hand the VAE, which must come back as it went in);
scenes of two or three palettes side by side (the same geometry drawn in each, blended across soft vertical edges:
what region prompts make). The latents are the frozen encoder's posterior means or samples, half each (train.py's UNet
learned from samples). L1 + MSE, AdamW, a short warm-up and a cosine to 5%, bf16 autocast on CUDA.

Measured (session 17, `--seconds 150` on one H100: 742 steps of 32): every large day sun of the checks decoded whole
and the three palettes kept, but the scenes as trained a little blurrier (31.5 against 32.1 dB), and through the
progressive stages no better than the own decoder (dusk suns lost at 1920x1080, green blotches in region skies): not
shipped. A next try should hold the trained scenes first (more of them, longer, or a loss against the own decoder on
them) before it learns the rest.
"""
import argparse, json, math, os, sys, time
import torch, torch.nn.functional as F
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "assets"))
from scenes import WORDS, count_suns, scenes, sun_edge_width
from diffusers import AutoencoderKL

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0]); ap.add_argument("out")
ap.add_argument("--vae", default=os.path.join(ROOT, "models", "scenes-sd", "vae"))
ap.add_argument("--seconds", type=float, default=None, help="training time (default 180; smoke 4)")
ap.add_argument("--batch", type=int, default=None, help="default 32 (smoke: 2)")
ap.add_argument("--size", type=int, default=None, help="training pictures' side, default 256 (smoke: 64)")
ap.add_argument("--lr", type=float, default=2e-4)
ap.add_argument("--report", default=None, help="the checks' JSON, default OUT-checks.json beside OUT")
ap.add_argument("--smoke", action="store_true", help="64 px, a few seconds: runs on a CPU")
a = ap.parse_args()
sm = a.smoke
seconds, B, S = a.seconds or (4 if sm else 180), a.batch or (2 if sm else 32), a.size or (64 if sm else 256)
dev = "cuda" if torch.cuda.is_available() else "cpu"
auto = dict(device_type="cuda", dtype=torch.bfloat16) if dev == "cuda" else dict(device_type="cpu", enabled=False)
out = os.path.abspath(a.out)
T00 = time.time()
torch.manual_seed(0); g = torch.Generator().manual_seed(7)
load = lambda p: AutoencoderKL.from_pretrained(p, local_files_only=True, torch_dtype=torch.float32).to(dev).eval()
old, vae = load(a.vae), load(a.vae)
old.requires_grad_(False); vae.requires_grad_(False)
params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
for p in params: p.requires_grad_(True)
rand = lambda *s: torch.rand(*s, generator=g)


def words(n): return [WORDS[int(i)] for i in torch.randint(0, 3, (n,), generator=g)]


def crops(n, size, lo, hi):
    """n crops of size x size from scenes drawn at one side of size x (lo to hi) a call (as train.py --zoom draws
    them)."""
    v = int(size * lo * (hi / lo) ** float(rand(())))
    big = scenes(n, v, words(n), g, dev)
    at = torch.randint(0, v - size + 1, (n, 2), generator=g).tolist()
    return torch.cat([big[i:i + 1, :, y0:y0 + size, x0:x0 + size] for i, (y0, x0) in enumerate(at)])


def enlarged(n, size):
    """n crops of scenes enlarged 1.5-4x by bicubic: blurred rims and smooth skies, as the stages hand them over."""
    x = scenes(n, size, words(n), g, dev)
    k = 1.5 + 2.5 * rand(n).to(dev)
    c = (1 - 1 / k) * (2 * rand(2, n).to(dev) - 1)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / k
    theta[:, 0, 2], theta[:, 1, 2] = c[0], c[1]
    grid = F.affine_grid(theta, (n, 3, size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bicubic", align_corners=False).clamp(-1, 1)


def alike(n, size, ws, state):
    """The same n scenes (the generator at `state` for each) drawn once in each list of palette words of `ws`."""
    layers = []
    for w in ws:
        g.set_state(state)
        layers.append(scenes(n, size, w, g, dev))
    return layers


def palettes(n, size):
    """n scenes of two or three palettes side by side: one geometry (`alike`) drawn in each palette, blended across
    soft vertical edges at random places."""
    state = g.get_state()
    layers = alike(n, size, [words(n) for _ in range(3)], state)
    x = torch.linspace(0, 1, size, device=dev).view(1, 1, 1, size)
    e = rand(n, 2).sort(dim=1).values.to(dev).view(n, 2, 1, 1, 1)
    soft = (0.01 + 0.1 * rand(n)).to(dev).view(n, 1, 1, 1)
    m1, m2 = torch.sigmoid((x - e[:, 0]) / soft), torch.sigmoid((x - e[:, 1]) / soft)
    m2 = m2 * (rand(n) < 0.5).float().to(dev).view(n, 1, 1, 1)  # half of them two palettes only
    return layers[0] * (1 - m1) + layers[1] * (m1 - m2).clamp(0, 1) + layers[2] * m2


KINDS = {"scene": lambda n: scenes(n, S, words(n), g, dev),
         "large_sun": lambda n: scenes(n, S, words(n), g, dev, sun=(0.04, 0.35)),
         "crop": lambda n: crops(n, S, 1.0, 4.0),
         "enlarged": lambda n: enlarged(n, S),
         "palettes": lambda n: palettes(n, S)}


def draw(n):
    k = [n // len(KINDS) + (i < n % len(KINDS)) for i in range(len(KINDS))]
    x = torch.cat([f(m) for f, m in zip(KINDS.values(), k) if m])
    return torch.where(torch.rand(n, 1, 1, 1, device=dev) < 0.5, x.flip(-1), x)


# 1. train the decoder
opt = torch.optim.AdamW(params, a.lr, betas=(0.9, 0.99), weight_decay=0)
vae.decoder.train(); vae.post_quant_conv.train()
step, t0, hist = 0, time.time(), []
while time.time() - t0 < seconds:
    frac = (time.time() - t0) / seconds
    for pg in opt.param_groups:
        pg["lr"] = a.lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
    x = draw(B)
    with torch.no_grad():
        post = old.encode(x).latent_dist
        z = torch.where(torch.rand(B, 1, 1, 1, device=dev) < 0.5, post.mean, post.sample())
    with torch.autocast(**auto):
        y = vae.decode(z).sample.float()
    l1, mse = F.l1_loss(y, x), F.mse_loss(y, x)
    opt.zero_grad(set_to_none=True); (l1 + mse).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    hist.append((l1.item(), mse.item()))
    if step % (5 if dev == "cpu" else 250) == 0:
        print(f"decoder {step} l1 {l1.item():.5f} mse {mse.item():.5f} {time.time() - t0:.0f}s", flush=True)
    step += 1
train_log = dict(steps=step, seconds=round(time.time() - t0, 1), batch=B, size=S, lr=a.lr,
                 last20_l1=sum(h[0] for h in hist[-20:]) / max(1, len(hist[-20:])))
print("trained", json.dumps(train_log), flush=True)
vae.eval().requires_grad_(False)

# 2. save as the original is saved (fp16 safetensors) and reload it as Tessera would
vae.to(torch.float16).save_pretrained(out, safe_serialization=True)
new = load(out)
enc_same = all(torch.equal(p.half(), q.half()) for p, q in zip(old.encoder.parameters(), new.encoder.parameters()))
assert enc_same and new.config.scaling_factor == old.config.scaling_factor, "the encoder must not change"

# 3. checks on held-out pictures (their own generator), the old decoder beside the new, fp32
g.manual_seed(12345)
H = 6 if sm else 24
psnr = lambda p, q: round((10 * torch.log10(4 / ((p.clamp(-1, 1) - q.clamp(-1, 1)) ** 2).mean())).item(), 2)
checks = {}
with torch.no_grad():
    enc = lambda x: torch.cat([old.encode(c).latent_dist.mean for c in x.split(8)])
    dec = lambda m, z: torch.cat([m.decode(c).sample.clamp(-1, 1) for c in z.split(8)])
    for name, f in KINDS.items():
        x = f(H)
        z = enc(x)
        checks[name] = {"psnr_old": psnr(dec(old, z), x), "psnr_new": psnr(dec(new, z), x)}
    # day scenes drawn sharp with suns 1.83x and 3.35x the trained ones (a stage's and two stages' enlargement):
    # one sun each as drawn; how many the decoders give back
    for k in (1.83, 3.35):
        side = int(S * k) // 8 * 8
        x = scenes(H, side, ["day"] * H, g, dev, sun=(0.04 * k, 0.085 * k))
        z = enc(x)
        suns = {m: [count_suns(im) for im in dec(d, z).cpu()] for m, d in (("old", old), ("new", new))}
        checks[f"day_large_sun_x{k}"] = {**suns, "drawn": [count_suns(im) for im in x.cpu()]}
    # the stages' round trips without the UNet: a day scene enlarged 1.83x by bicubic and sent through the VAE,
    # three times (256 > 464 > 848 > 1544 at --size 256); suns and rim after each
    x0 = scenes(4, S, ["day"] * 4, g, dev)
    for m, d in (("old", old), ("new", new)):
        x, chain = x0, []
        for _ in range(2 if sm else 3):
            side = int(x.shape[-1] * 1.83) // 8 * 8
            x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False).clamp(-1, 1)
            x = torch.cat([d.decode(old.encode(xi[None]).latent_dist.mean).sample.clamp(-1, 1) for xi in x])
            chain.append({"side": side, "suns": [count_suns(im) for im in x.cpu()],
                          "rim_px": [round(sun_edge_width(im), 1) for im in x.cpu()]})
        checks[f"day_round_trips_{m}"] = chain
    # three palettes side by side (dusk | day | night thirds, WORDS' order, hard edges): is each decoded third's mean
    # colour nearest to that third of the scene drawn in its own palette?
    thirds = alike(4, S, [[w] * 4 for w in WORDS], g.get_state())
    c = S // 3
    x = torch.cat([thirds[0][..., :c], thirds[1][..., c:2 * c], thirds[2][..., 2 * c:]], dim=-1)
    z = enc(x)
    for m, d in (("drawn", None), ("old", old), ("new", new)):
        y = x if d is None else dec(d, z)
        got = []
        for i in range(3):  # the palette whose own scene's mean over this third is nearest
            col = lambda t: t[..., i * c:(i + 1) * c].mean(dim=(0, 2, 3))
            got.append(min(range(3), key=lambda v: float((col(y) - col(thirds[v])).norm())))
        checks[f"three_palettes_{m}"] = [WORDS[v] for v in got]

report = dict(out=out, device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", smoke=sm, training=train_log,
              checks=checks, total_seconds=round(time.time() - T00, 1))
with open(a.report or out.rstrip("/") + "-checks.json", "w") as f:
    json.dump(report, f, indent=1)
print(json.dumps(checks, indent=1), flush=True)
print(f"total {time.time() - T00:.0f}s", flush=True)
