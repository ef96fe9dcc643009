"""What stockade's own tests and benchmarks use that a user's may too: the conformance suite
(``conformance``: what any isolate must do, for any placement) and a real local Ray cluster
(``ray_cluster``)."""
