"""Experiments: the synthetic comparison, the real-model benchmark, and the speed/memory bench."""
