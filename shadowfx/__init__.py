"""shadowfx: contextual sparsity for Hugging Face decoders, as compiler passes over a captured graph."""

from shadowfx import ops  # noqa: F401  (registers the shadowfx:: custom ops)
from shadowfx.api import discover, transform
from shadowfx.capture import CapturedDecoder, CaptureError, capture
from shadowfx.predictor import PredictorError, Scores, ShadowPredictor
from shadowfx.selection import SparsityError
from shadowfx.structure import DecoderStructure, FingerprintMismatch, StructureError

__all__ = [
    "CaptureError",
    "CapturedDecoder",
    "DecoderStructure",
    "FingerprintMismatch",
    "PredictorError",
    "Scores",
    "ShadowPredictor",
    "SparsityError",
    "StructureError",
    "capture",
    "discover",
    "transform",
]
