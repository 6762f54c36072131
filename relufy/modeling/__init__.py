"""In-memory activation swap and the modeling code written into converted checkpoints."""
