"""`fusion-export serve`: an OpenAI-compatible HTTP server over the Python API (engines/pipeline.py)."""
