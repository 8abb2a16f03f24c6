"""shadowfx: contextual sparsity for Hugging Face decoders, as compiler passes over a captured graph."""
