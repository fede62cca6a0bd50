"""Figures and how they are taken: the metric table, evaluation (quality against the float
baseline on the same tokens, speed and memory in a fresh child process), intervals, the
evaluation text, the results store, and `bench`, which measures many specs in one run."""
