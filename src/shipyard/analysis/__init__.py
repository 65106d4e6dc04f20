"""Canary analysis: thresholds (``policy``) and measurement verdicts (``verdicts``), pure.

The orchestrator's Analyse executor reads the router's per-revision metrics, hands windows of
them to ``verdicts.judge`` and tallies the results in a ``verdicts.AnalysisRun``; the canary planner
(strategies/canary.py) resolves each stage's ``policy.AnalysisPolicy``. Nothing here does I/O.
"""
