"""Canary analysis: thresholds (``policy``), measurement verdicts (``verdicts``) and
``[[analysis.metrics]]`` (``metrics``: a reading judged by a metric's conditions, each metric's
tallies and schedule), all pure; ``providers`` is the one module that does I/O (Prometheus's
HTTP API, a web endpoint's JSON).

The orchestrator's Analyse executor reads the router's per-revision metrics (or each listed
metric's provider), hands windows of them to ``verdicts.judge`` (or readings to
``metrics.judge_reading``) and tallies the results in a ``verdicts.AnalysisRun`` per metric; the
canary planner (strategies/canary.py) resolves each stage's ``policy.AnalysisPolicy``.
"""
