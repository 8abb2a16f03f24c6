"""Pass infrastructure on ``torch.fx.passes.infra``: what shadowfx adds is the per-layer count of what a pass changed
and the preconditions its passes check (``requires``), so a pass run out of order names what it is missing."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence

from torch.fx import GraphModule
from torch.fx.passes.infra import pass_base
from torch.fx.passes.infra.pass_manager import PassManager

from shadowfx.passes.graph import selection_nodes

SELECTION_PASSES = "insert_shadow, insert_layerwise or selection_inputs"


class PassResult(pass_base.PassResult):
    """fx's result (the module, whether it changed) and the changes counted per layer (key: layer index)."""

    per_layer: dict[int, int]

    def __new__(cls, graph_module: GraphModule, modified: bool, per_layer: dict[int, int] | None = None) -> PassResult:
        result = super().__new__(cls, graph_module, modified)
        # fx's result is a two-field namedtuple: the counts are an attribute beside it, which copies keep
        result.per_layer = dict(per_layer or {})
        return result

    @property
    def total(self) -> int:
        return sum(self.per_layer.values())


class PassError(RuntimeError):
    """A pass failed or cannot run on this graph; the message names the pass and the ones that ran before it."""


class GraphPass(pass_base.PassBase):
    """A pass works in place on a GraphModule; ``requires`` raises :class:`PassError` naming what is missing, and
    ``ensures`` lints the graph after the pass."""

    name: str  # the key of its result in run_passes

    @abstractmethod
    def call(self, graph_module: GraphModule) -> PassResult: ...

    def ensures(self, graph_module: GraphModule) -> None:
        graph_module.graph.lint()


def require_selection(graph_pass: GraphPass, gm: GraphModule, kind: str, layers: Sequence[int]) -> None:
    """The graph must carry the ``kind`` ("kv_heads" | "neurons") selection of each of ``layers``."""
    chosen = selection_nodes(gm)
    missing = [index for index in layers if (kind, index) not in chosen]
    if missing:
        raise PassError(f"{graph_pass.name} needs the {kind} selection of layers {missing}, which the graph does not "
                        f"have; run {SELECTION_PASSES} first")


def require_no_selection(graph_pass: GraphPass, gm: GraphModule) -> None:
    """A graph gets one selection: a second would shadow the first's nodes."""
    chosen = selection_nodes(gm)
    if chosen:
        raise PassError(f"{graph_pass.name} adds a selection, but the graph already has one "
                        f"({sorted(chosen)}); run only one of {SELECTION_PASSES}")


def require_nodes(graph_pass: GraphPass, gm: GraphModule, wanted: dict[str, str]) -> None:
    """The graph must hold the nodes ``wanted`` names (what it is -> node name), i.e. the structure describes it."""
    names = {node.name for node in gm.graph.nodes}
    missing = [f"{what} ({name})" for what, name in wanted.items() if name not in names]
    if missing:
        raise PassError(f"{graph_pass.name} needs nodes the graph does not have: {', '.join(missing)}; the structure "
                        "describes another graph, or a pass removed them")


def run_passes(gm: GraphModule, passes: Sequence[GraphPass]) -> dict[str, PassResult]:
    """Run ``passes`` in order on ``gm`` with fx's PassManager (which recompiles after each); returns each pass's
    result by name."""
    results: dict[str, PassResult] = {}

    def recorded(graph_pass: GraphPass) -> Callable[[GraphModule], PassResult]:
        # PassManager returns only the last result, so each pass's is kept here; it names passes by __name__
        def run(module: GraphModule) -> PassResult:
            results[graph_pass.name] = graph_pass(module)
            return results[graph_pass.name]

        run.__name__ = graph_pass.name
        return run

    try:
        PassManager([recorded(graph_pass) for graph_pass in passes])(gm)
    except Exception as error:  # PassManager's error names the pass and those before it; its cause says why
        raise PassError(f"{error}: {error.__cause__}") from error.__cause__
    return results
