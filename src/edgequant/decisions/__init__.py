"""Choosing from figures: hardware profiles, quality gates, `recommend`, `optimize` (search and
the Pareto front), the certificate of its winner, and recipes that replay a decision."""
