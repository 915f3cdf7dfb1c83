"""TransformerLens sites found from module provenance and dataflow: the spec, hook names, cfg."""
