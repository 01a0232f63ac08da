"""Honest evaluation: per-class metrics, ROC, COVID sensitivity/specificity with intervals, per-source."""
