"""Pass infrastructure: every pass does one job on a GraphModule and reports what it changed, per layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch.fx import GraphModule


@dataclass(frozen=True)
class PassResult:
    """The (in-place) rewritten module, whether anything changed, and the changes counted per layer."""

    graph_module: GraphModule
    modified: bool
    per_layer: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.per_layer.values())


class GraphPass(ABC):
    """A pass works in place; the base class lints and recompiles the graph after it."""

    name: str = "pass"

    def __call__(self, gm: GraphModule) -> PassResult:
        result = self.run(gm)
        gm.graph.lint()
        gm.recompile()
        return result

    @abstractmethod
    def run(self, gm: GraphModule) -> PassResult: ...


class PassError(RuntimeError):
    """A pass failed; the message names the pass and the ones that ran before it."""


def run_passes(gm: GraphModule, passes: Sequence[GraphPass]) -> dict[str, PassResult]:
    """Run ``passes`` in order on ``gm``; returns each pass's result by name."""
    results: dict[str, PassResult] = {}
    for graph_pass in passes:
        try:
            results[graph_pass.name] = graph_pass(gm)
        except Exception as error:
            raise PassError(f"pass {graph_pass.name} failed after {list(results) or 'no passes'}: {error}") from error
    return results
