"""Ray: start or join a cluster, workers that each hold a loaded model, and the scheduler that feeds them.

Ray is imported with the scheduler, on first use of its names: the renderer (`cluster.renderer`) runs without it."""
from .renderer import Renderer

__all__ = ["Renderer", "ClusterError", "connect", "run_job"]


def __getattr__(name):
    if name in ("ClusterError", "connect", "run_job"):
        from . import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
