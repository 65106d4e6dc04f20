"""Shipyard: zero-downtime deployment pipeline (ADR-014)."""

__version__ = "0.1.0"
