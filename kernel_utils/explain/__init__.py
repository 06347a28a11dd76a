"""Figures, Grad-CAM boxes and occlusion maps: what a competitor would rather look at than read."""
