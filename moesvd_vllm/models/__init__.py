"""vLLM model classes of the plugin-only architectures, one module per original architecture."""
