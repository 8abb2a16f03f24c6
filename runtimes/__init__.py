"""Runtimes that execute rewritten graphs (installed as ``shadowfx.runtimes``)."""
