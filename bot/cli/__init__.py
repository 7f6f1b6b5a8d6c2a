"""The entry layer: the ``minigpt4-bot`` command line and the composition root (``serve``).

The only code that may import every layer — core, storage, model and the front ends (found through
the plugin registry, not named).
"""
