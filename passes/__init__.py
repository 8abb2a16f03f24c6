"""Graph passes over captured decoder graphs (installed as ``shadowfx.passes``)."""
