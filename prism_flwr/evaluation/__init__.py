"""Sample quality: the evaluator, its metrics and feature network, plots and the closing summary."""
