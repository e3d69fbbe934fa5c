"""``jaxllama serve``: an OpenAI-compatible server with continuous batching (see server.py)."""
