"""The three SAELens architectures of sae-adaptive-plugin, one module each (see ``plugin.py``)."""
