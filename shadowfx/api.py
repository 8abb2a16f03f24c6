"""The public entry points."""

from __future__ import annotations

from torch import nn

from shadowfx.capture import capture
from shadowfx.passes.discover_structure import discover_structure
from shadowfx.structure import DecoderStructure


def discover(model: nn.Module) -> DecoderStructure:
    """Capture ``model``'s prefill graph and describe its layers, heads and MLPs."""
    return discover_structure(capture(model))
