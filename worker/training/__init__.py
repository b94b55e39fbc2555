"""Training: heads and fine-tuning on a project's corrections (run on the training queue)."""
