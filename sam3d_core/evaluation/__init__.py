"""Evaluation: the paper's metrics (`metrics`), model-free baselines (`baselines`), and `sam3d eval` (`run`).

Importing this package loads nothing; import the submodules.
"""
