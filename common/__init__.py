"""Shared foundation of the four method packages: backbones, data, MACs, explanations, run utilities."""
