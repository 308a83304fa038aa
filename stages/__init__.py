"""One module per pipeline stage: `run(config, ...)` over stores and models."""
