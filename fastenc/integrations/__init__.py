"""Drop-in use of fastenc encoders in diffusers pipelines (needs transformers; diffusers for the pipelines).

``T5Replacement(encoder)`` sits in a pipeline's T5 slot (``text_encoder_2`` of Flux, ``text_encoder_3``
of SD3, ``text_encoder`` of the others: :data:`fastenc.targets.TARGETS` says which);
``use_in_pipeline(pipe, encoder)`` finds that slot, checks the width and fills it.
"""

from .diffusers import expected_embedding_dims, find_t5_slot, pipeline_target, use_in_pipeline
from .text_encoder import T5Replacement, T5ReplacementConfig

__all__ = ["T5Replacement", "T5ReplacementConfig", "use_in_pipeline", "find_t5_slot", "pipeline_target",
           "expected_embedding_dims"]
