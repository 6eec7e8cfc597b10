"""The demo models: the trained landscape model shipped with Tessera, and a tiny random-weight pipeline for tests.

``model=demo`` is ``models/scenes-sd/`` (package data, 25 MB, :func:`shipped_demo_path`): the test bed of
``../shared/testbed``, a small pipeline in the Stable Diffusion 1.x layout (8.7 M-parameter UNet, 4-channel 8x VAE,
a CLIP text encoder over a character vocabulary, DDIM) trained on procedural landscapes at 256x256.  It draws one
sun (or moon), one horizon with mountains, and the palette its prompt names: ``a dusk landscape``, ``a day
landscape``, ``a night landscape``.  It loads like any local SD 1.x folder.  ``models/scenes-sd-light-vae/``
(:func:`shipped_light_vae_path`) is a light VAE distilled from its own, for ``model.vae=light``.

``model=demo_random`` is the random-weight pipeline below, for tests where what a picture shows does not matter.
Nothing here reaches a model hub.  ``build_demo_pipeline`` builds every component in code (the
tokenizer from a vocabulary written to a temporary folder), ``ensure_demo`` saves it once with
``save_pretrained`` into a cache folder, and ``load_demo_pipeline`` loads it back with
``StableDiffusionPipeline.from_pretrained(..., local_files_only=True)``: the same path a real local
SD 1.x diffusers folder takes.

Shapes follow SD 1.x (4 latent channels, VAE downsampling 8, 77-token prompts, Euler scheduler with
SD 1.x's betas), sizes are tiny so that everything runs fast on a 2-core CPU:

* UNet: 4 levels (8, 16, 16, 32 channels), cross-attention at the deepest level and in the mid
  block, cross_attention_dim 32, sample_size 64.  A forward pass on a [8, 4, 64, 64] latent batch
  takes about 45-50 ms with 2 threads.
* VAE: 4 levels (8, 8, 16, 32 channels), so ``vae_scale_factor == 8``; decoding [1, 4, 64, 64] to
  [1, 3, 512, 512] takes about 110-150 ms with 2 threads.
* Text encoder: CLIP, hidden 32, 2 layers, 4 heads, 77 positions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import uuid

import torch
from diffusers import (  # the package's __init__ has set HF_HUB_OFFLINE (unless the user set it) before this
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

__all__ = [
    "DEMO_VERSION",
    "SHIPPED_DEMO",
    "shipped_demo_path",
    "default_demo_path",
    "build_demo_pipeline",
    "ensure_demo",
    "load_demo_pipeline",
]

# Bump when the architecture, configs or tokenizer change: the cache folder name includes it, so a
# stale cached pipeline is never picked up.
DEMO_VERSION = "1"

_MAX_LENGTH = 77
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
# A few merges so that common words become single tokens (the rest falls back to byte characters).
_MERGES = [
    "t h",
    "th e</w>",
    "a n",
    "an d</w>",
    "o f</w>",
    "i n</w>",
    "c a",
    "ca t</w>",
    "d o",
    "do g</w>",
]


# The trained demo's folder, package data of `models` (pyproject.toml's package-data), so an editable install, a
# wheel and a plain checkout all carry it.
SHIPPED_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scenes-sd")
# its light VAE (model.vae=light): distilled from models/scenes-sd/vae by bench/train_light_vae.py
SHIPPED_LIGHT_VAE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scenes-sd-light-vae")


def shipped_demo_path() -> str:
    """The folder of the trained demo model (``model=demo``), or an error saying the install lacks it."""
    if not os.path.isfile(os.path.join(SHIPPED_DEMO, "model_index.json")):
        from jobs.spec import ConfigError

        raise ConfigError(
            "model.name", "demo", f"its weights are missing from {SHIPPED_DEMO} (package data of Tessera's "
            "`models`); reinstall Tessera (python3 -m pip install -e .), or use model=demo_random (random weights)"
        )
    return SHIPPED_DEMO


def shipped_light_vae_path() -> str:
    """The folder of the demo's light VAE (``model.vae=light``), or an error saying the install lacks it."""
    if not os.path.isfile(os.path.join(SHIPPED_LIGHT_VAE, "config.json")):
        from jobs.spec import ConfigError

        raise ConfigError("model.vae", "light", f"its weights are missing from {SHIPPED_LIGHT_VAE} (package data of "
                          "Tessera's `models`); reinstall Tessera (python3 -m pip install -e .), or use model.vae=null")
    return SHIPPED_LIGHT_VAE


def default_demo_path() -> str:
    """The random demo's cache folder: ``$TESSERA_CACHE/demo-v<version>``, or ``~/.cache/tessera/demo-v<version>``."""
    root = os.environ.get("TESSERA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tessera"
    )
    return os.path.join(root, f"demo-v{DEMO_VERSION}")


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2 / CLIP) maps bytes to."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tiny_vocab() -> dict[str, int]:
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars]
    tokens += ["".join(m.split(" ")) for m in _MERGES]
    tokens += [_BOS, _EOS]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab


def _write_vocab_files(folder: str) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (the files of a CLIP BPE tokenizer) into ``folder``."""
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(_tiny_vocab(), f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(_MERGES) + "\n")


def _build_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer from a tiny byte-level vocabulary, written to and loaded from a temp dir."""
    with tempfile.TemporaryDirectory(prefix="tessera-tok-") as tmp:
        _write_vocab_files(tmp)
        return CLIPTokenizer.from_pretrained(
            tmp,
            local_files_only=True,
            model_max_length=_MAX_LENGTH,
            bos_token=_BOS,
            eos_token=_EOS,
            unk_token=_EOS,
            pad_token=_EOS,
        )


_BUILD_LOCK = threading.Lock()


def build_demo_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Build the tiny random-weight SD 1.x-style pipeline; the same seed gives the same weights.

    Each component is initialised right after ``torch.manual_seed(seed)``.  The caller's global
    CPU RNG state is restored afterwards, and concurrent builds in threads are serialised so they
    cannot interleave their draws.
    """
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        return _build(seed)


def _build(seed: int) -> StableDiffusionPipeline:
    tokenizer = _build_tokenizer()

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=8,
    )

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=512,
        scaling_factor=0.18215,
    )

    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_LENGTH,
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)

    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )

    for module in (unet, vae, text_encoder):
        module.eval()

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def ensure_demo(path: str | None = None) -> str:
    """Return a folder holding the saved demo pipeline, building and saving it on first use.

    The pipeline is saved into a temporary sibling folder and renamed into place, so ``path`` is
    either absent or complete.  When several processes race, each builds its own copy; the first
    rename wins and the others discard theirs.
    """
    path = os.path.abspath(os.path.expanduser(path or default_demo_path()))
    if _is_complete(path):
        return path

    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(
        prefix=f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-", dir=parent
    )
    try:
        build_demo_pipeline().save_pretrained(tmp, safe_serialization=True)
        # transformers 5 saves only tokenizer.json; real SD folders (and transformers 4's slow
        # CLIPTokenizer) also carry the BPE files, so write them too.
        tok_dir = os.path.join(tmp, "tokenizer")
        if not os.path.isfile(os.path.join(tok_dir, "vocab.json")):
            _write_vocab_files(tok_dir)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        if not _is_complete(tmp):  # pragma: no cover - save_pretrained always writes it
            raise RuntimeError(f"save_pretrained wrote no model_index.json into {tmp}")
        try:
            os.rename(tmp, path)
        except OSError:
            if _is_complete(path):  # another process won the race: keep theirs
                return path
            # ``path`` is in the way but is not a pipeline; replace it only if it is empty.
            try:
                os.rmdir(path)
            except OSError:
                raise RuntimeError(
                    f"{path} exists but holds no saved pipeline (no model_index.json); "
                    "remove it or choose another path"
                ) from None
            try:
                os.rename(tmp, path)
            except OSError:
                if _is_complete(path):
                    return path
                raise
        return path
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def load_demo_pipeline(path: str) -> StableDiffusionPipeline:
    """Load a saved demo pipeline the way a local SD 1.x diffusers folder is loaded."""
    return StableDiffusionPipeline.from_pretrained(
        path,
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
