"""Kubernetes I/O shared by the coordinator and the operator: one REST client and one
status writer."""
