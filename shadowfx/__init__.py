"""shadowfx: contextual sparsity for Hugging Face decoders, as compiler passes over a captured graph."""

from shadowfx import ops  # noqa: F401  (registers the shadowfx:: custom ops)
from shadowfx.api import discover, transform
from shadowfx.capture import CapturedDecoder, CaptureError, capture
from shadowfx.calibrate import calibrate, load_traces
from shadowfx.comparison import evaluate
from shadowfx.onnx_export import export_onnx
from shadowfx.predictor import PredictorError, Scores, ShadowPredictor, StaticScores, load_predictor, save_predictor
from shadowfx.selection import SparsityError, SparsityWarning
from shadowfx.structure import DecoderStructure, FingerprintMismatch, StructureError
from shadowfx.training import train_predictor

__all__ = [
    "CaptureError",
    "CapturedDecoder",
    "DecoderStructure",
    "FingerprintMismatch",
    "PredictorError",
    "Scores",
    "ShadowPredictor",
    "SparsityError",
    "SparsityWarning",
    "StaticScores",
    "StructureError",
    "calibrate",
    "capture",
    "discover",
    "evaluate",
    "export_onnx",
    "load_predictor",
    "load_traces",
    "save_predictor",
    "train_predictor",
    "transform",
]
