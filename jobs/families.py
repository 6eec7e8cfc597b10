"""The model families: one torch-free description each, and which ``model.name`` belongs to which.

:data:`FAMILIES` holds a :class:`FamilySpec` per family: what ``jobs`` validates a job against (schedulers,
pipeline class, single files, patch size, shipped code) and the defaults it plans with (the stage guides);
``module`` names the ``models/`` module whose ``FAMILY`` (``models.base.Family``) loads it with torch.
:data:`MODELS` maps each ``model.name`` to its family.  A new family is one row in each of the two tables,
one adapter module in ``models/`` and one ``conf/model/<name>.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

NOISE_SCHEDULERS = ("euler", "euler_a", "ddim", "dpmpp_2m_karras", "unipc")  # epsilon/v-prediction UNets
FLOW_SCHEDULERS = ("flow_euler",)  # flow-matching families (DiTs): FlowMatchEulerDiscreteScheduler


@dataclass(frozen=True)
class FamilySpec:
    """One model family, as far as it is known without torch.

    `pipeline`: the class a family's diffusers folder holds (model_index.json's `_class_name`), `pipeline_aliases`
    older names of that class that folders in the wild still carry.  `schedulers`: the `job.scheduler` values that
    fit, `auto` being the first.  `native`: the side in pixels the family is trained at, where the loaded model's
    config does not say (`models.base.Adapter.native_size`).  `patch`: a transformer's latent pixels per patch
    side (a tile, and a canvas side smaller than a tile, must be whole patches); None for a UNet.
    `single_file`: what one original-layout .safetensors file holds: "pipeline" (from_single_file; model.config
    then supplies configs and tokenizers), "transformer" (the transformer alone, e.g. ComfyUI's
    `model.diffusion_model.` files; model.config is a diffusers folder that supplies the rest, weights included),
    or None: it loads from diffusers folders only, for the reason `folder_only`.  `remote_code`: its weights ship
    Python code, so its folders load only with model.trust_remote_code.  `anchor`, `dilation`: how its enlarged
    stages hold their composition when job.anchor / job.dilation are null.  `xml_prompts`: how an XML prompt
    reaches its text encoder (jobs.xml_prompts): "xml" as written, "tags" flattened.  `deep_cache`: its denoiser
    runs in two parts for model.deep_cache (models/deepcache.py).
    """

    name: str
    module: str
    pipeline: str
    schedulers: Tuple[str, ...]
    native: int
    anchor: float
    dilation: float
    patch: Optional[int] = None
    single_file: Optional[str] = "pipeline"
    folder_only: str = ""
    pipeline_aliases: Tuple[str, ...] = ()
    remote_code: bool = False
    xml_prompts: str = "tags"
    deep_cache: bool = False


# The stage guides were measured on the test beds (BENCHMARKS.md "The low-frequency anchor"): the UNets keep their
# base's sun at 1920x1080 and 3840x2160 with the anchor, dilated sampling adding nothing; the Z-Image-layout test
# bed keeps it and sharpens the rim with dilated sampling alone (the anchor left it blurred, 20 px against 4).
# The DiTs are trained at about 1024 x 1024 (their configs do not say).
FAMILIES: Dict[str, FamilySpec] = {f.name: f for f in (
    FamilySpec("sd", "models.sd", "StableDiffusionPipeline", NOISE_SCHEDULERS, native=512, anchor=1.0, dilation=0.0,
               deep_cache=True),
    FamilySpec("sdxl", "models.sdxl", "StableDiffusionXLPipeline", NOISE_SCHEDULERS, native=1024, anchor=1.0,
               dilation=0.0, deep_cache=True),
    FamilySpec("z_image", "models.zimage", "ZImagePipeline", FLOW_SCHEDULERS, native=1024, anchor=0.0, dilation=0.5,
               patch=2, single_file="transformer", deep_cache=True),
    FamilySpec("lumina2", "models.lumina2", "Lumina2Pipeline", FLOW_SCHEDULERS, native=1024, anchor=0.0,
               dilation=0.5, patch=2, single_file="transformer", pipeline_aliases=("Lumina2Text2ImgPipeline",)),
    # NewbiePipeline is not in diffusers: models/newbie.py holds it.  Its Jina CLIP v2 text encoder is shipped code.
    FamilySpec("newbie", "models.newbie", "NewbiePipeline", FLOW_SCHEDULERS, native=1024, anchor=0.0, dilation=0.5,
               patch=2, single_file=None, remote_code=True, xml_prompts="xml",
               folder_only="its transformer is Tessera's own NewbieTransformer2DModel, whose original layout "
                           "diffusers' single-file converters do not know"),
)}

# model.name -> family.  `demo` is the trained landscape model shipped in the package (models/scenes-sd);
# `demo_random` a tiny random-weight SD 1.x pipeline built in code (tests).
MODELS = {"demo": "sd", "demo_random": "sd", "sd15": "sd", "sdxl": "sdxl", "z_image": "z_image",
          "lumina2": "lumina2", "newbie": "newbie"}
DEMO_MODELS = ("demo", "demo_random")  # weights that come with Tessera (no model.config; demo: no model.path either)


def family_of(name: str) -> FamilySpec:
    """The spec of a model name ("sd15") or a family name ("sd")."""
    return FAMILIES[MODELS.get(name, name)]
