"""Input limits the toolkit enforces before any work (light: no heavy imports, so the CLI's help can show them)."""

# 64 M pixels (an 8000 x 8000 photo): decoding allocates ~4 bytes per pixel before the resize to 768 x 768.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
