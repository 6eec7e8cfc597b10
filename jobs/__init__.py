"""Job specs, their expansion into image requests, image files and the Parquet manifest.

Knows nothing of torch or Ray.
"""
from .images import read_parameters, sha256_file, write_image
from .manifest import SCHEMA, Manifest
from .plan import ImageRequest, image_id, plan
from .spec import (ClusterConfig, ConfigError, JobConfig, ModelConfig, OutputConfig, RegionConfig, TesseraConfig,
                   TesseraError, TilingConfig, prompts_of, read_prompt_file, validate)

__all__ = [
    "ClusterConfig", "ConfigError", "ImageRequest", "JobConfig", "Manifest", "ModelConfig",
    "OutputConfig", "RegionConfig", "SCHEMA", "TesseraConfig", "TesseraError", "TilingConfig", "image_id", "plan", "prompts_of",
    "read_parameters", "read_prompt_file", "sha256_file", "validate", "write_image",
]
