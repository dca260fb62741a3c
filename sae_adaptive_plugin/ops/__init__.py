"""Pure tensor operations of sae-adaptive-plugin (no SAELens imports), each next to a plain reference."""
