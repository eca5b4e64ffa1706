"""The one training loop, its data-parallel plumbing and checkpoints."""
