"""Data sources, the device-resident loader, the training loop, accuracy and the audited score."""

from microsearch.evaluation.score import RULES, LayerCost, Rule, Score, audit

__all__ = ["RULES", "LayerCost", "Rule", "Score", "audit"]
