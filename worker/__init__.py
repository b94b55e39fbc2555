"""prelabel's compute path: RQ job functions and the vision models they run.

Nothing is loaded at import time; ``prelabel-worker`` loads the model once per process. The worker
imports ``common/`` and never ``backend/``.
"""
