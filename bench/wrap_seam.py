"""The wrap seam of a seamless panorama through the progressive strategy, on the demo model (CPU, one thread):
`wrap_seam_score` across x of the same picture rendered without and with `tiling.wrap=x`.

    OMP_NUM_THREADS=1 python3 bench/wrap_seam.py [CHECKOUT]     # CHECKOUT: another tree to compare (default: this)
"""
import json
import os
import sys


def main() -> None:
    root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, root)  # the tree compared: imported after its path is set
    os.chdir(root)
    import numpy as np
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf
    from PIL import Image

    from cluster.renderer import Renderer
    from jobs import plan
    from jobs.spec import TesseraConfig
    from tiling.seams import wrap_seam_score

    ConfigStore.instance().store(name="tessera_schema", node=TesseraConfig)
    res = {}
    for wrap in ("none", "x"):
        with initialize_config_dir(config_dir=os.path.join(root, "conf"), version_base="1.3"):
            cfg = OmegaConf.to_object(compose("config", overrides=[
                "model=demo", "job.width=1536", "job.height=256", "job.steps=20", "job.stage_factor=4",
                f"tiling.wrap={wrap}", "job.prompts=['a night landscape']", "job.seeds=[1]",
                f"output.dir=/tmp/wrapcheck-{os.path.basename(root)}-{wrap}"]))
        r = Renderer(cfg.model, cfg.output, threads=1)
        row = r.render(plan(cfg)[0])
        assert row["status"] == "ok", row["error"]
        px = np.asarray(Image.open(os.path.join(cfg.output.dir, row["path"])).convert("RGB"))
        res[wrap] = {"stages": row["stages"], "wrap_seam_score_x": float(wrap_seam_score(px, "x")),
                     "seam_score": row["seam_score"]}
    print(json.dumps({"code": root, **res}))


if __name__ == "__main__":
    main()
