"""What stockade's own tests and benchmarks use that a user's may too: a real local Ray cluster."""
