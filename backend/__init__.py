"""prelabel's request path: a Flask service speaking Label Studio's ML backend protocol.

It validates, enqueues and answers within Label Studio's timeouts; it imports no torch and no
model code (``common/`` holds what it shares with the worker).
"""
