"""Flower deployment-engine tooling: the warm ClientApp executor. The only code here that imports Flower."""
