"""fedkube.operator: the Kopf operator for FederatedJobs and ClientNodes.

- ``crdgen``: the CRDs generated from ``fedkube.runtime.spec`` (``fedkube crds``);
- ``resources``: pure builders of a job's children (and readers of their state);
- ``handlers``: the kopf handlers (``fedkube operator``, or ``kopf run -m
  fedkube.operator.handlers``); ``job_status``: pure edits of the operator's share of a
  job's status, which the handlers apply through ``fedkube.runtime.kube``;
- ``settings``: FEDKUBE_* knobs of the operator; ``cli``: the sub-commands;
- ``rbac/``: ClusterRole of the operator and the Role template of a coordinator.

It reaches the runtime only through ``fedkube.runtime.spec`` and ``fedkube.runtime.kube``
(an import-linter contract).
"""
