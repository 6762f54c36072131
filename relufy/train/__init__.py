"""Continued pretraining: recipes, data mixture, the Accelerate loop, warm start."""
