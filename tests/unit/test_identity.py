"""Mutual TLS's binding of a client certificate to a node id, and the TLS options of the
CLI (flags, or the environment for the agent)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedkube.runtime.cli import _agent_tls, _coordinator_tls, build_parser
from fedkube.runtime.coordinator import identity
from fedkube.runtime.messages import Rejected, RejectReason
from fedkube.runtime.spec import ManifestError


def test_the_certificate_cn_is_the_node_id() -> None:
    certified = identity.certified_id({"x509_common_name": [b"Edge-7"],
                                       "x509_subject_alternative_name": [b"other"]})
    assert certified == "edge-7"
    assert identity.bind("edge-7", certified) == "edge-7"
    assert identity.bind(" EDGE-7 ", certified) == "edge-7"
    assert identity.bind("", certified) == "edge-7"  # no id asked for: the certificate's
    with pytest.raises(Rejected) as refused:
        identity.bind("edge-8", certified)
    assert refused.value.reason is RejectReason.WRONG_IDENTITY
    assert refused.value.reason.code == "PERMISSION_DENIED"
    assert "edge-8" in str(refused.value) and "CN='edge-7'" in str(refused.value)


@pytest.mark.parametrize("context", [{}, {"x509_common_name": []},
                                     {"x509_common_name": [b" "]}])
def test_a_connection_without_a_certificate_identity_is_refused(context) -> None:
    with pytest.raises(Rejected) as refused:
        identity.certified_id(context)
    assert refused.value.reason is RejectReason.WRONG_IDENTITY


def test_the_agent_takes_its_tls_files_from_flags_or_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDKUBE_TLS_CA", "/env/ca.crt")
    monkeypatch.setenv("FEDKUBE_TLS_CERT", "/env/node.crt")
    monkeypatch.setenv("FEDKUBE_TLS_KEY", "/env/node.key")
    args = build_parser().parse_args(["agent", "--coordinator", "c:1",
                                      "--tls-cert", "/flag/node.crt", "--tls-key", "/flag/k"])
    assert _agent_tls(args) == {"tls_ca": Path("/env/ca.crt"),
                                "tls_cert": Path("/flag/node.crt"), "tls_key": Path("/flag/k")}
    monkeypatch.delenv("FEDKUBE_TLS_KEY")
    args = build_parser().parse_args(["agent", "--coordinator", "c:1"])
    with pytest.raises(ManifestError, match="--tls-cert and --tls-key"):
        _agent_tls(args)


def test_the_coordinator_takes_a_client_ca_only_with_its_own_certificate() -> None:
    def tls(*flags: str):
        return _coordinator_tls(build_parser().parse_args(["coordinator", "--job", "j",
                                                           *flags]))

    assert tls() is None
    files = tls("--tls-cert", "s.crt", "--tls-key", "s.key", "--tls-client-ca", "ca.crt")
    assert (files.cert, files.key, files.client_ca) == (
        Path("s.crt"), Path("s.key"), Path("ca.crt"))
    assert tls("--tls-cert", "s.crt", "--tls-key", "s.key").client_ca is None
    with pytest.raises(ManifestError, match="--tls-client-ca needs --tls-cert"):
        tls("--tls-client-ca", "ca.crt")
