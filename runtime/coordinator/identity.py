"""Mutual TLS: the client certificate's identity is the node id.

With a client CA configured, the TLS handshake already refused every caller without a
certificate signed by that CA; what is left is to bind the certificate to the node id the
caller names. The identity is the certificate's subject Common Name (CN), the convention
Kubernetes itself uses for client certificates (CN = user name): a certificate with
`CN=edge-7` may register as `edge-7` only, and every later call for `edge-7` must come over
a connection authenticated by that certificate. (SANs are for server names; the CN is the
one field every CA tool fills in.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..messages import Rejected, RejectReason

# The gRPC auth-context property holding the peer certificate's subject CN.
COMMON_NAME = "x509_common_name"


def certified_id(auth_context: Mapping[str, Sequence[bytes]]) -> str:
    """The node id the peer's certificate proves (normalised as the registry does), or
    Rejected(WRONG_IDENTITY) when the connection carries no certificate identity."""
    names = auth_context.get(COMMON_NAME) or ()
    if len(names) != 1 or not names[0].strip():
        raise Rejected(RejectReason.WRONG_IDENTITY,
                       "this coordinator requires a client certificate whose subject CN is "
                       "the node id; the connection carries none")
    return names[0].decode(errors="replace").strip().lower()


def bind(requested: str, certified: str) -> str:
    """The node id a caller may act as: its certificate's, and only that one. An empty
    request (let the coordinator assign one) gets the certificate's id."""
    wanted = requested.strip().lower()
    if wanted and wanted != certified:
        raise Rejected(RejectReason.WRONG_IDENTITY,
                       f"node id {requested!r} does not match the client certificate "
                       f"(CN={certified!r})")
    return certified
