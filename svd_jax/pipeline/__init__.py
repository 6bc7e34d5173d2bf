"""The generation: argument checks and program inputs (``inputs``), pure stages (``stages``), the pipeline class
(``pipeline``) and progress reporting (``progress``)."""

from .inputs import GenerationInputs, GenerationRequest
from .pipeline import (
    STREAM_DECODE_BYTES,
    StableVideoDiffusionPipeline,
    StableVideoDiffusionPipelineOutput,
    resolve_dtype,
)

__all__ = ["STREAM_DECODE_BYTES", "GenerationInputs", "GenerationRequest", "StableVideoDiffusionPipeline",
           "StableVideoDiffusionPipelineOutput", "resolve_dtype"]
