"""Training the built-in demo model with the Med-MoE recipe in miniature (`medmoe-edge train-demo`)."""
