"""Job specs, their expansion into image requests, image files and the Parquet manifest.

Knows nothing of torch or Ray.
"""
from .images import read_parameters, sha256_file, write_image
from .lock import OutputBusyError, OutputLock
from .manifest import SCHEMA, Manifest, recover
from .plan import ImageRequest, Plan, RenderSpec, image_id, plan
from .spec import (ClusterConfig, ConfigError, JobConfig, ModelConfig, OutputConfig, RegionConfig, TesseraConfig,
                   TesseraError, TilingConfig, prompts_of, read_prompt_file, validate)

__all__ = [
    "ClusterConfig", "ConfigError", "ImageRequest", "JobConfig", "Manifest", "ModelConfig",
    "OutputBusyError", "OutputLock", "OutputConfig", "Plan", "RegionConfig", "RenderSpec", "SCHEMA", "recover",
    "TesseraConfig", "TesseraError", "TilingConfig", "image_id", "plan", "prompts_of",
    "read_parameters", "read_prompt_file", "sha256_file", "validate", "write_image",
]
