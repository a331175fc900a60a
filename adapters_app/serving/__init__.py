"""Framework-free serving: base model loading, adapter cache, multi-LoRA layers, generation.

Nothing in this package imports Django, so it can be tested and reused on its own.
"""
