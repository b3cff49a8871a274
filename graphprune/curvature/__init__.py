"""Curvature statistics (K-FAC, per-sample gradients, WoodFisher) and OBS weight compensation."""
