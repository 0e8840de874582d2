"""Dense decoder packages: the staged graphs, the exit head, exit adapters."""
