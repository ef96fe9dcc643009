"""Kubernetes: the manifests a cluster operator applies to run stockade isolates as agent-sandbox pods."""
