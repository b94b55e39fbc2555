"""prelabel's request path: a Flask service speaking Label Studio's ML backend protocol.

Kept free of torch and Flask at import time: the worker imports ``backend.settings``,
``backend.jobs`` and ``backend.errors`` (the shared contract) from here.
"""

__version__ = "0.1.0"
