"""Load an HF model and export it to an fx graph (torch.export), with version shims."""
