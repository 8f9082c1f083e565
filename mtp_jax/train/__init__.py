"""Train state, optimizer, the multi-task step and the training loop."""
