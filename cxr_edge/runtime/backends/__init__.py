"""Inference backends behind one protocol, chosen through a registry by artifact format."""
