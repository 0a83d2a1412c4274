"""Export-friendly wrappers around the reference: one module per exported graph, each with a GraphSpec.

Static shapes where TensorRT wants them and no data-dependent Python branches live here, not in the model.
"""
