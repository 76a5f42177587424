"""Models in and out: loading and checking, opsets, external data, graph helpers, the preparation passes, saving."""
