"""Kubernetes I/O shared by the coordinator and the operator: one REST client
(`client.KubeClient`), one status writer (`status.JobStatusWriter`, server-side apply of
one writer's share) and the coordinator's background StatusSink (`sink`)."""
