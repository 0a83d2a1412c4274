"""The file names that make a folder an artifact or an engine folder: format facts, defined once (renaming one
breaks every folder made before). The manifests' contents are fusion_export/manifest.py and
engines/tensorrt/engine_manifest.py; output_files.protected_folder recognizes folders by these names."""

MANIFEST = "manifest.json"  # an artifact folder's manifest
ENGINE_MANIFEST = "engines.json"  # an engine folder's manifest (engines/tensorrt/engine_manifest.py)
EMBEDDINGS_FILE = "embed_tokens.safetensors"  # the token-embedding table, in artifacts and engine folders alike
GRAPHS = ("vision_encoder", "decoder_prefill", "decoder_step")  # one ONNX graph / one engine each
