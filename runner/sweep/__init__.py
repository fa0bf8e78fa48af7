"""Multirun sweeps: which job is which (context), and what the sweep found (summary, best job)."""
