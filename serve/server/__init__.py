"""The adapter server: a shipped adapter in front of a vendor, over HTTP (Starlette on uvicorn), torch-free."""
