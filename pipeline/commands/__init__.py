"""CLI commands, one module per room of the pipeline; `pipeline.cli` gathers them."""
