"""The HTTP layer: thin routes that parse, call the pipeline and render."""
