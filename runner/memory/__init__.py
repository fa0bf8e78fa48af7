"""The memory estimator (runner/memory/estimate.py, terms.py): below both backends, which both ask it."""
