"""kubeapi.resource_of (a rule, not a kind table) names the resource the API server serves for
every kind the operator creates or refers to: checked against the real API server's discovery."""

from __future__ import annotations

import re
from pathlib import Path

from kubetune_trainer import kubeapi
from kubetune_trainer.api import KIND
from localenv.testing import ROOT, Cluster

OPERATOR = ROOT / "operator" / "kubetune_operator"


def _kinds_in_the_operator() -> set[str]:
    kinds = {KIND}
    for source in OPERATOR.glob("*.py"):
        kinds |= set(re.findall(r'"kind": "([A-Za-z]+)"', Path(source).read_text()))
    return kinds


def test_every_kind_the_operator_writes_maps_to_its_served_resource(cluster: Cluster) -> None:
    listing = cluster.kubectl("api-resources", "--no-headers").stdout
    served: dict[str, set[str]] = {}
    for line in listing.splitlines():
        columns = line.split()
        served.setdefault(columns[-1], set()).add(columns[0])  # KIND -> NAME(s)
    kinds = _kinds_in_the_operator()
    assert {"Job", "ServiceAccount", "Role", "RoleBinding", "Service", "Deployment"} <= kinds
    for kind in sorted(kinds):
        assert kind in served, f"{kind} is not served by the API server"
        assert kubeapi.resource_of(kind) in served[kind], (kind, served[kind])
