"""The generator: frozen random weights, learned scores, stochastic masks, the local objective."""
