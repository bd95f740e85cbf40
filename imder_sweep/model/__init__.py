"""IMDer model components: configs, score UNet, reconstruction, MulT fusion, the full model."""

from imder_sweep.model.config import (
    PRESETS,
    FusionConfig,
    ModelConfig,
    ReconstructionConfig,
    SamplerConfig,
    ScoreLossConfig,
    ScoreNetConfig,
    SDEConfig,
    reference_mosei,
    reference_mosi,
)
from imder_sweep.model.imder import IMDer, IMDerOutput, count_parameters

__all__ = [
    "PRESETS",
    "FusionConfig",
    "IMDer",
    "IMDerOutput",
    "ModelConfig",
    "ReconstructionConfig",
    "SDEConfig",
    "SamplerConfig",
    "ScoreLossConfig",
    "ScoreNetConfig",
    "count_parameters",
    "reference_mosei",
    "reference_mosi",
]
