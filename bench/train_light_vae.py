"""Distils a light VAE for the demo model (models/scenes-sd) from its own VAE: a student AutoencoderKL in the
teacher's latent space (4 channels, the same scaling_factor, 8x, the same block types), so the demo's UNet is
unchanged, with no mid-block attention and narrower channels, and saves it as a diffusers VAE folder (fp16
safetensors, as models/scenes-sd/vae) that can stand in for models/scenes-sd/vae (`model.vae=FOLDER`).

    python3 bench/train_light_vae.py OUT [--teacher models/scenes-sd/vae] [--channels 16,32,64,128] [--groups 16]
                            [--seconds S | --dec-seconds S --enc-seconds S] [--batch B] [--size PX] [--pool N]
                            [--init teacher|random|FOLDER] [--report PATH] [--smoke]

On one H200 the shipped student (models/scenes-sd-light-vae, `model.vae=light`) took `--zoom 0.6 --dec-seconds 330
--enc-seconds 100`: 460 s in all, the pool, FLOP count and checks about 30 s of it (BENCHMARKS.md "The light demo
VAE": what it decodes well and what not). `--smoke` (64 px, 3 s a half) runs end to end on a 2-core CPU in 17 s; a
CPU run at 128 px (`--size 128 --batch 8 --pool 256 --held 12 --dec-seconds 80 --enc-seconds 40 --threads 2`)
takes 143 s and trains 62 decoder and 114 encoder steps (far too few for a usable student: the GPU run's job).
Needs only torch, diffusers and numpy (and tests/assets/scenes.py, this repository's tiling/vae for one check);
no network: the teacher is read with local_files_only.

Why this student (`--channels 16,32,64,128 --groups 16`, layers_per_block 1 as the teacher): at 3840x2160 the
teacher's decode is 12.5 TFLOP (8.6 of them the mid-block attention over 129,600 latent positions) and its encode
9.8 TFLOP (the same attention again); the student's are 1.37 and 0.45 TFLOP (9x and 22x less; the checks print
both, counted by torch's FlopCounterMode on the meta device). Without the attention most of the cost is the
convolutions at full and half resolution, whose width is the first entries of block_out_channels: 16 there (the
teacher's 32) is a quarter of their FLOPs; 8 (8,16,32,128: 0.71 / 0.26 TFLOP) would halve that again with 8
channels to carry the picture at full resolution. The latent-resolution end stays 128 wide (cheap: 1/64 of the
pixels), which also lets `--init teacher` copy every tensor whose name and shape match the teacher's (the
decoder's conv_in, mid-block resnets and first up block, the encoder's mid block, conv_out, the quant convs) as
a warm start. GroupNorm stays (16 groups: one channel a group at full resolution, as the teacher's 32 groups of
32 channels), since Tessera's tiled VAE shares GroupNorm statistics across tiles (tiling/vae; tests/test_vae.py
runs it on an attention-free VAE too); one check here decodes a large latent tiled and whole.

Training, each half on its own clock, AdamW with a short warmup and a cosine to 5%, bf16 autocast on CUDA (the
teacher runs in fp32/TF32 for clean targets), scenes of tests/assets/scenes.py (dusk, day, night alike) at --size
px from a pool drawn once on the device, flipped left-right, and a quarter of them crops enlarged 1.5-4x
(bilinear): the smooth, enlarged content the progressive stages hand the VAE at 1152x640 and 3840x2160.
* decoder: L1 + MSE between student.decode(z) and teacher.decode(z), z = the teacher's posterior mean
  + a * std * noise with a = 0, 1 (a posterior sample: what the teacher's decoder and the UNet were trained on,
  train.py's `latent_dist.sample()`; its std is ~0.65 against the mean's 0.66) or uniform in [0, 1.5] (latents
  further off the encoder's, as a UNet's can be), a third each;
* encoder: MSE between the student's posterior mean and the teacher's (what Tessera encodes: `latent_dist.mean`)
  + 0.1 x MSE of their log-variances (so `latent_dist.sample()` also behaves as the teacher's).
Checks, on the saved folder reloaded in fp32 and scenes drawn from another seed: PSNR of the student's decode
against the teacher's (posterior means and samples), the encoder's latent MSE (and relative to the latents'
variance), the student's whole round trip against the teacher's, count_suns / sun_edge_width (rim) /
horizon_jumps on the decoded pictures, the same on 4x-enlarged scenes decoded at 1024 px, the tiled decode's
agreement with the whole-frame one, and parameters and FLOPs of both. Written to --report (default OUT-checks.json)
and printed.
"""
import argparse, copy, json, math, os, sys, time
import torch, torch.nn.functional as F
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "assets"))
from scenes import WORDS, count_suns, horizon_jumps, scenes, sun_edge_width
from diffusers import AutoencoderKL
from torch.utils.flop_counter import FlopCounterMode

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0]); ap.add_argument("out")
ap.add_argument("--teacher", default=os.path.join(ROOT, "models", "scenes-sd", "vae"))
ap.add_argument("--channels", default="16,32,64,128", help="the student's block_out_channels")
ap.add_argument("--groups", type=int, default=16, help="the student's norm_num_groups")
ap.add_argument("--seconds", type=float, default=None, help="both halves' training time (default 120 each; smoke 3)")
ap.add_argument("--dec-seconds", type=float, default=None)
ap.add_argument("--enc-seconds", type=float, default=None)
ap.add_argument("--batch", type=int, default=None, help="default 32 (smoke: 4)")
ap.add_argument("--size", type=int, default=None, help="training scenes' side, default 256 (smoke: 64)")
ap.add_argument("--pool", type=int, default=None, help="scenes drawn once to train on, default 4096 (smoke: 16)")
ap.add_argument("--held", type=int, default=None, help="held-out scenes of the checks, default 48 (smoke: 6)")
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--mse", type=float, default=1.0, help="weight of the decoder's MSE beside its L1")
ap.add_argument("--zoom", type=float, default=0.25, help="share of training scenes that are enlarged crops")
ap.add_argument("--init", default="teacher",
                help="teacher: copy the teacher's tensors whose names and shapes match (a warm start); random; or a "
                     "student's VAE folder to go on training (its own channels and groups)")
ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
ap.add_argument("--report", default=None, help="the checks' JSON, default OUT-checks.json beside OUT")
ap.add_argument("--smoke", action="store_true", help="64 px, a few seconds a half: runs on a CPU")
a = ap.parse_args()
sm = a.smoke
dec_s = next(v for v in (a.dec_seconds, a.seconds, 3 if sm else 120) if v is not None)
enc_s = next(v for v in (a.enc_seconds, a.seconds, 3 if sm else 120) if v is not None)
B, S = a.batch or (4 if sm else 32), a.size or (64 if sm else 256)
POOL, HELD = a.pool or (16 if sm else 4096), a.held or (6 if sm else 48)
if a.threads: torch.set_num_threads(a.threads)
dev = "cuda" if torch.cuda.is_available() else "cpu"
if dev == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
auto = dict(device_type="cuda", dtype=torch.bfloat16) if dev == "cuda" else dict(device_type="cpu", enabled=False)
out = os.path.abspath(a.out)
report_path = a.report or out.rstrip("/") + "-checks.json"
T00 = time.time()
torch.manual_seed(0); g = torch.Generator().manual_seed(1)
npar = lambda m: sum(p.numel() for p in m.parameters())

# 1. the teacher, and the student in its latent space
teacher = AutoencoderKL.from_pretrained(a.teacher, local_files_only=True, torch_dtype=torch.float32).to(dev).eval()
teacher.requires_grad_(False)
cfg = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
cfg.update(block_out_channels=tuple(int(c) for c in a.channels.split(",")), norm_num_groups=a.groups,
           mid_block_add_attention=False)
assert len(cfg["block_out_channels"]) == len(teacher.config.block_out_channels), "keep the 8x factor: 4 blocks"
if a.init not in ("teacher", "random"):  # a student saved before: its config wins over --channels / --groups
    student = AutoencoderKL.from_pretrained(a.init, local_files_only=True, torch_dtype=torch.float32).to(dev)
    cfg = {k: v for k, v in student.config.items() if not k.startswith("_")}
else:
    student = AutoencoderKL(**cfg).to(dev)
copied = []
if a.init == "teacher":
    ts, ss = teacher.state_dict(), student.state_dict()
    copied = [k for k, v in ss.items() if k in ts and ts[k].shape == v.shape]
    student.load_state_dict({**ss, **{k: ts[k] for k in copied}})
print(f"teacher {npar(teacher) / 1e6:.3f}M params, student {npar(student) / 1e6:.3f}M: block_out_channels "
      f"{cfg['block_out_channels']}, norm_num_groups {cfg['norm_num_groups']}, no mid-block attention; "
      f"{len(copied)} tensors "
      f"({sum(student.state_dict()[k].numel() for k in copied) / 1e6:.3f}M values) copied from the teacher", flush=True)


def flops(vae, h, w):
    """TFLOP of a whole-frame decode and encode at h x w pixels, counted on the meta device (no memory, no time)."""
    m = copy.deepcopy(vae).to("meta").float()
    z, x = torch.empty(1, 4, h // 8, w // 8, device="meta"), torch.empty(1, 3, h, w, device="meta")
    res = []
    with torch.no_grad():
        for f in (lambda: m.decode(z), lambda: m.encode(x)):
            with FlopCounterMode(display=False) as fc:
                f()
            res.append(round(fc.get_total_flops() / 1e12, 4))
    return dict(decode=res[0], encode=res[1])


FLOPS = {name: {f"{w}x{h}": flops(m, h, w) for w, h in ((3840, 2160), (1152, 640))}
         for name, m in (("teacher", teacher), ("student", student))}
print("TFLOP (whole frame)", json.dumps(FLOPS), flush=True)

# 2. the pool of scenes, drawn once on the device
t0 = time.time()
pool = []
with torch.no_grad():
    for i in range(0, POOL, 256):
        n = min(256, POOL - i)
        words = [WORDS[j] for j in torch.randint(0, 3, (n,), generator=g)]
        pool.append(scenes(n, S, words, g, dev).to(torch.float16 if dev == "cuda" else torch.float32))
pool = torch.cat(pool)
print(f"pool of {len(pool)} scenes at {S} px in {time.time() - t0:.1f}s", flush=True)


def draw(n):
    """n training pictures: pool scenes, half flipped left-right, a `--zoom` share enlarged crops (1.5-4x)."""
    x = pool[torch.randint(0, len(pool), (n,), device=pool.device)].float()
    x = torch.where(torch.rand(n, 1, 1, 1, device=dev) < 0.5, x.flip(-1), x)
    zi = torch.nonzero(torch.rand(n, device=dev) < a.zoom).flatten()
    if len(zi):
        k = 1.5 + 2.5 * torch.rand(len(zi), device=dev)  # enlargement; the crop spans 1/k of the picture
        c = (1 - 1 / k) * (2 * torch.rand(2, len(zi), device=dev) - 1)  # its centre, inside the picture
        theta = torch.zeros(len(zi), 2, 3, device=dev)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / k
        theta[:, 0, 2], theta[:, 1, 2] = c[0], c[1]
        grid = F.affine_grid(theta, (len(zi), 3, S, S), align_corners=False)
        x[zi] = F.grid_sample(x[zi], grid, mode="bilinear", align_corners=False)
    return x


def train(name, params, seconds, step_loss):
    opt = torch.optim.AdamW(params, a.lr, betas=(0.9, 0.99), weight_decay=0)
    step, t0, hist = 0, time.time(), []
    while time.time() - t0 < seconds:
        frac = (time.time() - t0) / seconds
        for pg in opt.param_groups:
            pg["lr"] = a.lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        loss, parts = step_loss()
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
        hist.append(parts)
        if step % (20 if dev == "cpu" else 250) == 0:
            print(f"{name} {step} " + " ".join(f"{k} {v:.5f}" for k, v in parts.items()) +
                  f" {time.time() - t0:.0f}s", flush=True)
        step += 1
    el = time.time() - t0
    tail = {k: sum(h[k] for h in hist[-20:]) / len(hist[-20:]) for k in hist[0]} if hist else {}
    print(f"{name} done: {step} steps of {B} in {el:.0f}s ({step / el:.1f} steps/s); the last 20 steps' "
          + " ".join(f"{k} {v:.5f}" for k, v in tail.items()), flush=True)
    return dict(steps=step, seconds=round(el, 1), first=hist[0] if hist else {}, last20=tail)


def dec_step():
    x = draw(B)
    with torch.no_grad():
        post = teacher.encode(x).latent_dist
        u = torch.rand(B, 1, 1, 1, device=dev)
        amp = torch.where(u < 1 / 3, 0.0, torch.where(u < 2 / 3, 1.0, 1.5 * torch.rand(B, 1, 1, 1, device=dev)))
        z = post.mean + amp * post.std * torch.randn_like(post.mean)
        target = teacher.decode(z).sample
    with torch.autocast(**auto):
        y = student.decode(z).sample
    y = y.float()
    l1, mse = F.l1_loss(y, target), F.mse_loss(y, target)
    return l1 + a.mse * mse, dict(l1=l1.item(), mse=mse.item())


def enc_step():
    x = draw(B)
    with torch.no_grad():
        tp = teacher.encode(x).latent_dist
    with torch.autocast(**auto):
        moments = student.quant_conv(student.encoder(x)) if student.quant_conv is not None else student.encoder(x)
    mean, logvar = moments.float().chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)  # as DiagonalGaussianDistribution
    lm, lv = F.mse_loss(mean, tp.mean), F.mse_loss(logvar, tp.logvar)
    return lm + 0.1 * lv, dict(mean_mse=lm.item(), logvar_mse=lv.item())


student.train()
dec_params = list(student.decoder.parameters()) + list(student.post_quant_conv.parameters() if student.post_quant_conv is not None else [])
enc_params = list(student.encoder.parameters()) + list(student.quant_conv.parameters() if student.quant_conv is not None else [])
student.requires_grad_(False)
for p in dec_params: p.requires_grad_(True)
log = dict(decoder=train("decoder", dec_params, dec_s, dec_step))
student.requires_grad_(False)
for p in enc_params: p.requires_grad_(True)
log["encoder"] = train("encoder", enc_params, enc_s, enc_step)
student.requires_grad_(False).eval()
del pool
if dev == "cuda": torch.cuda.empty_cache()

# 3. save as the teacher is saved (fp16 safetensors), and reload it as Tessera would
student.to(torch.float16).save_pretrained(out, safe_serialization=True)
size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
print(f"saved {out}: {sorted(os.listdir(out))}, {size / 2**20:.2f} MiB", flush=True)
del student
s = AutoencoderKL.from_pretrained(out, local_files_only=True, torch_dtype=torch.float32).to(dev).eval()
t = teacher
assert s.config.scaling_factor == t.config.scaling_factor and s.config.latent_channels == t.config.latent_channels

# 4. checks on held-out scenes (another generator), in fp32
psnr = lambda p, q: (10 * torch.log10(4 / ((p.clamp(-1, 1) - q.clamp(-1, 1)) ** 2).mean())).item()
hg = torch.Generator().manual_seed(12345)
words = [WORDS[i % 3] for i in range(HELD)]
x = scenes(HELD, S, words, hg, dev)
res = {}
with torch.no_grad():
    chunks = lambda f, v: torch.cat([f(c) for c in v.split(16)])
    tp = [t.encode(c).latent_dist for c in x.split(16)]
    tz, tstd = torch.cat([p.mean for p in tp]), torch.cat([p.std for p in tp])
    tzs = tz + tstd * torch.randn(tz.shape, generator=hg).to(dev)
    sp = [s.encode(c).latent_dist for c in x.split(16)]
    sz, slv = torch.cat([p.mean for p in sp]), torch.cat([p.logvar for p in sp])
    tlv = torch.cat([p.logvar for p in tp])
    dec = lambda m, z: chunks(lambda c: m.decode(c).sample, z)
    t_img, s_img = dec(t, tz), dec(s, tz)
    t_smp, s_smp = dec(t, tzs), dec(s, tzs)
    s_rt = dec(s, sz)
    res["decode_psnr_vs_teacher"] = dict(posterior_mean=psnr(s_img, t_img), posterior_sample=psnr(s_smp, t_smp))
    res["encoder"] = dict(latent_mse=F.mse_loss(sz, tz).item(), latent_var=tz.var().item(),
                          relative_mse=(F.mse_loss(sz, tz) / tz.var()).item(), logvar_mse=F.mse_loss(slv, tlv).item())
    res["round_trip_psnr"] = dict(student_vs_teacher=psnr(s_rt, t_img), teacher_vs_scene=psnr(t_img, x),
                                  student_vs_scene=psnr(s_rt, x), student_decoder_on_teacher_latent_vs_scene=psnr(s_img, x))
    # the student's decode of the teacher's latent through the teacher's encoder again: the progressive stages'
    # round trip (decode, enlarge, encode) with the student on both sides drifts by this much per trip
    res["round_trip_psnr"]["student_twice_vs_teacher_twice"] = psnr(dec(s, chunks(lambda c: s.encode(c).latent_dist.mean, s_rt)),
                                                                     dec(t, chunks(lambda c: t.encode(c).latent_dist.mean, t_img)))

    def measures(imgs):
        imgs = imgs.clamp(-1, 1).cpu()  # as pictures are written
        suns = [count_suns(im) for im in imgs]
        rims = [sun_edge_width(im) for im in imgs]
        rims = [r for r in rims if r == r]
        return dict(suns=suns, rim_px_median=float(torch.tensor(rims).median()) if rims else None,
                    horizon_jumps_mean=sum(horizon_jumps(im) for im in imgs) / len(imgs))

    meas = {k: measures(v) for k, v in (("scene", x), ("teacher_decode", t_img), ("student_decode", s_img),
                                         ("student_round_trip", s_rt))}
    for k in ("student_decode", "student_round_trip"):
        meas[k]["suns_agree_with_teacher"] = sum(p == q for p, q in zip(meas[k]["suns"], meas["teacher_decode"]["suns"])) / HELD
    res["measures_held_out"] = meas

    # enlarged scenes, as the stages hand them to the VAE: 4x bilinear (smoke: 2x), decoded whole, and tiled
    k = 2 if sm else 4
    xl = F.interpolate(x[:4], scale_factor=k, mode="bilinear", align_corners=False)
    tzl = t.encode(xl).latent_dist.mean
    tl, sl = t.decode(tzl).sample, s.decode(tzl).sample
    szl = s.encode(xl).latent_dist.mean
    large = dict(size=xl.shape[-1], decode_psnr_vs_teacher=psnr(sl, tl), encoder_relative_mse=(F.mse_loss(szl, tzl) / tzl.var()).item(),
                 teacher=measures(tl), student=measures(sl))
    try:
        sys.path.insert(0, ROOT)
        from tiling.vae import decode_tiled_shared, encode_tiled
        z1, lat = tzl[:1], tzl.shape[-1]
        tiled = decode_tiled_shared(s, z1, tile=lat // 2, overlap=lat // 8).to(dev)
        large["tiled_decode_psnr_vs_whole"] = psnr(tiled, sl[0])
        enc_t = encode_tiled(s, xl[:1], tile=lat // 2, overlap=lat // 8).to(dev)
        large["tiled_encode_max_abs_diff_vs_whole"] = (enc_t - szl[:1]).abs().max().item()
    except ImportError as e:  # the script copied out of the repository
        large["tiled_decode_psnr_vs_whole"] = f"not run: {e}"
    res["enlarged"] = large

report = dict(out=out, device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", smoke=sm, size=S, batch=B,
              pool=POOL, held=HELD, student_config={k: cfg[k] for k in ("block_out_channels", "norm_num_groups",
                                                                         "mid_block_add_attention", "layers_per_block",
                                                                         "latent_channels", "scaling_factor")},
              init=a.init, tensors_copied=len(copied), params=dict(teacher=npar(t), student=npar(s)),
              tflops=FLOPS, saved_mib=round(size / 2**20, 2), training=log, checks=res,
              total_seconds=round(time.time() - T00, 1))
with open(report_path, "w") as f:
    json.dump(report, f, indent=1)
summary = {k: v for k, v in res.items() if k != "measures_held_out"}
print(json.dumps(summary, indent=1))
print("suns (scene / teacher / student / student round trip):",
      *(meas[k]["suns"] for k in ("scene", "teacher_decode", "student_decode", "student_round_trip")),
      "rim px:", *(meas[k]["rim_px_median"] for k in ("scene", "teacher_decode", "student_decode", "student_round_trip")))
print(f"report {report_path}; total {time.time() - T00:.0f}s", flush=True)
