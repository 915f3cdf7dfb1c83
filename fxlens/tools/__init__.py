"""Tools on top of the API: graph dumps, Model Explorer, the command line, harvesting, checkpoints."""
