"""Running one arm: the loop, the DeepSpeed engine, checkpoints, process groups, metrics."""
