"""``autoseg analyze``: calibration and failure detection, subgroups (and robustness, explanations) of a trained run.

Shared case loading, output writing and the command group live in :mod:`autoseg.analysis.common`.
"""
