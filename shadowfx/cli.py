"""The ``shadowfx`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import torch

from shadowfx.capture import CaptureError, PrefillStep, capture
from shadowfx.families import FAMILIES, build_small
from shadowfx.loading import ModelLoadError, load_decoder
from shadowfx.passes.discover_structure import discover_structure
from shadowfx.structure import DecoderStructure, StructureError

USER_ERRORS = (ModelLoadError, CaptureError, StructureError, FileNotFoundError, ValueError)


def describe_rewrites(structure: DecoderStructure) -> str:
    """What the sparsifying passes replace in this model."""
    rewritten = structure.layers[1:]
    lines = [
        f"  rewrite plan: 1 shadow predictor reading node {structure.predictor_input_node} "
        f"({structure.predictor_input_size} features) of layer 0, which stays dense",
        f"    {len(rewritten)} attentions -> shadowfx::gathered_attention, {len(rewritten)} MLPs -> "
        "shadowfx::gathered_mlp",
    ]
    for layer in rewritten:
        attention, mlp = layer.attention, layer.mlp
        groups = (f"{attention.num_kv_heads} KV groups of {attention.kv_group_size}"
                  if attention.kv_group_size > 1 else f"{attention.num_heads} heads")
        lines.append(
            f"    layer {layer.index}: attention {attention.module} selects among {groups}; "
            f"MLP {mlp.down.module} selects among {mlp.intermediate_size} {mlp.activation} neurons"
        )
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    model = load_decoder(args.model, attn_implementation=args.attn)
    structure = discover_structure(capture(model))
    if args.json:
        print(structure.to_json())
    else:
        print(structure.summary())
        print(describe_rewrites(structure))
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Capture each embedded small model, check the graph against eager, and show its structure and rewrite plan."""
    families = args.family or list(FAMILIES)
    generator = torch.Generator().manual_seed(0)
    report = []
    for family in families:
        model = build_small(family)
        started = time.perf_counter()
        captured = capture(model)
        structure = discover_structure(captured)
        seconds = time.perf_counter() - started
        input_ids = torch.randint(0, structure.vocab_size, (3, 12), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :5] = 0  # one left-padded row
        with torch.no_grad():
            eager = PrefillStep(model)(input_ids, attention_mask)
            graph = captured(input_ids, attention_mask)
        difference = (eager - graph).abs().max().item()
        report.append({"family": family, "capture_and_discover_s": round(seconds, 2),
                       "max_abs_diff_vs_eager": difference, "structure": structure.to_dict()})
        if not args.json:
            print(f"== {family}: captured and discovered in {seconds:.1f} s; graph vs eager max |diff| "
                  f"{difference:.2e} on a left-padded 3x12 batch")
            print(structure.summary())
            print(describe_rewrites(structure))
            print()
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shadowfx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="print the decoder structure of a local model directory or config")
    inspect.add_argument("model", help="directory written by save_pretrained, or a config.json")
    inspect.add_argument("--json", action="store_true", help="print the DecoderStructure as JSON")
    inspect.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention implementation")
    inspect.set_defaults(run=_inspect)

    demo = commands.add_parser("demo", help="capture the embedded small models and show what shadowfx would rewrite")
    demo.add_argument("--family", action="append", choices=FAMILIES, help="only this family (repeatable)")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"shadowfx {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
