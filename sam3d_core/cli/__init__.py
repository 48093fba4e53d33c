"""The `sam3d` command: one module per command group; `main.main` is the entry point. Only this package
parses arguments or prints."""
