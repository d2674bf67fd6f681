"""Vendors: the backend protocols, one copy of every vendor rule, the HTTP clients, the in-process open_clip backend.

Everything here but :mod:`.open_clip_backend` is torch-free, so the runtime and the server use the same clients,
reply checks, retry rules and key handling as fit.
"""
