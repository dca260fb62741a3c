"""The three SAELens architectures of sae-adaptive-plugin (see ``plugin.py``) on one TopK-family
base (``topk_family``): ``adaptivek`` (+ ``adaptivek_warmup``), ``softsae`` (+ ``softsae_config``),
``hierarchical_topk``.

``sae_lens`` is imported here, before any architecture module runs: its first import triggers the
plugin registration, which imports every architecture module, and that must not happen while one
of them is half-initialised (importing e.g. ``sae_adaptive_plugin.saes.adaptivek`` first thing).
"""

import sae_lens  # noqa: F401  (completes registration before an architecture module starts)
