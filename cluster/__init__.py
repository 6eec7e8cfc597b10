"""Ray: start or join a cluster, workers that each hold a loaded model, and the scheduler that feeds them."""
from .renderer import Renderer, denoise_request
from .scheduler import ClusterError, connect, run_job

__all__ = ["Renderer", "denoise_request", "ClusterError", "connect", "run_job"]
