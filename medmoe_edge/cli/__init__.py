"""The `medmoe-edge` command line: a thin layer over `medmoe_edge.api` and friends."""
