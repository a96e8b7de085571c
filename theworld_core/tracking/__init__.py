"""MLflow: where runs go, how stages log into them, and the model registry."""
