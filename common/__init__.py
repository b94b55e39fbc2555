"""What the request path (``backend/``) and the compute path (``worker/``) share: settings, errors,
the job schema, Redis keys, project ids, model versions and Label Studio's formats.

Nothing here imports Flask, torch or either path: both stand on this package, and meet only
through the job payloads defined in ``common.jobs``.
"""
