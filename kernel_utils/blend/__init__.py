"""Blending the models: the prior, the weight searches, calibration (05)."""
