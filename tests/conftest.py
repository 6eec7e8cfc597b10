"""Shared fixtures: one random-weight demo model per session (built in code, loaded from disk), one Ray per module;
`compose`, the job as run.py sees it (with model=demo_random unless a test names a model)."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as models/__init__.py does: some test modules import diffusers first


@pytest.fixture(scope="session", autouse=True)
def demo_cache(tmp_path_factory):
    """Every test's random demo model (model=demo_random) lives in one session cache, built once, never in the
    user's ~/.cache."""
    path = tmp_path_factory.mktemp("tessera-cache")
    old = os.environ.get("TESSERA_CACHE")
    os.environ["TESSERA_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TESSERA_CACHE", None)
    else:
        os.environ["TESSERA_CACHE"] = old


@pytest.fixture(scope="module")
def one_thread():
    """One BLAS thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models spend
    no time waiting on a second thread, timings hold on a busy machine, and sums are bitwise stable."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def ray_local():
    """A small embedded Ray instance shared by a module's tests."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"TESSERA_CACHE": os.environ["TESSERA_CACHE"]}})
    yield ray
    ray.shutdown()


RANDOM = "model=demo_random"  # the random-weight demo: fast, for tests where what a picture shows does not matter


def compose(*overrides):
    """The job as `python run.py model=demo_random <overrides>` would see it, as a validated-type TesseraConfig.

    Tests run the random-weight demo (and the default job and tiling) unless the overrides name a model:
    `compose("model=demo")` is the README's first command, the trained demo model with its own job and tiling."""
    from hydra import compose as hydra_compose, initialize
    from omegaconf import OmegaConf

    import run  # noqa: F401  registers the schema

    named = any(o.lstrip("+~").startswith("model=") for o in overrides)
    with initialize(config_path="../conf", version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("config", overrides=([] if named else [RANDOM]) + list(overrides)))


SMALL = ["job.width=196", "job.height=130", "job.steps=3", "tiling.tile=16", "tiling.overlap=4",
         "tiling.vae_tile=16", "tiling.vae_overlap=4", "tiling.batch=2"]


def render_first(renderer, out, base, *overrides):
    """The first image of the config `base` + `overrides` (written under `out`) through `renderer`: its request
    and its row, which must be ok."""
    from jobs import plan

    cfg = compose(*base, f"output.dir={out}", *overrides)
    req = plan(cfg)[0]
    row = renderer.render(req)
    assert row["status"] == "ok", row["error"]
    return req, row


def assert_renders_small(renderer, cfg, other_seed_cfg, out) -> dict:
    """`cfg`'s first image (SMALL's 196x130, several tiles) through `renderer`: written at the right size, not
    constant, the same bytes when rendered again, other bytes for `other_seed_cfg`'s seed; its row."""
    import numpy as np
    from PIL import Image

    from jobs import plan

    req = plan(cfg)[0]
    row = renderer.render(req)
    assert row["status"] == "ok", row["error"]
    img = Image.open(out / row["path"])
    assert img.size == (196, 130) and np.asarray(img).std() > 1.0
    first = (out / row["path"]).read_bytes()
    assert renderer.render(req)["sha256"] == row["sha256"] and (out / row["path"]).read_bytes() == first
    other = renderer.render(plan(other_seed_cfg)[0])
    assert other["status"] == "ok" and other["sha256"] != row["sha256"]
    return row
