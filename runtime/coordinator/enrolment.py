"""Who may join and who is who: the join token, the registration gate and the session
credentials in one place, so the engine asks a single question per call."""

from __future__ import annotations

import dataclasses
import secrets

from ..messages import Registration, Rejected, RejectReason
from ..spec import AdmissionSpec
from .admission import RegistrationGate
from .registry import Client, ClientRegistry
from .sessions import SessionBook


class Enrolment:
    """Register returns (client, credential); every later call is `authenticate`d.

    Re-registering an id needs that id's credential; without it the caller is enrolled
    under a new id instead, so nobody can take over (or overwrite) another node's record.
    Under mTLS the client certificate is that proof (`certified`): a node that lost its
    session (a wiped state folder) keeps its id.
    """

    def __init__(self, registry: ClientRegistry, spec: AdmissionSpec, *,
                 join_token: str | None) -> None:
        self.registry = registry
        self.join_token = join_token
        self.sessions = SessionBook()
        self.gate = RegistrationGate(spec)
        self.expire_after = spec.expire_after_seconds
        self.max_samples = spec.max_samples_per_client

    def enrol(self, registration: Registration, *,
              certified: bool = False) -> tuple[Client, str]:
        if self.join_token and not secrets.compare_digest(
                registration.join_token.encode(), self.join_token.encode()):
            raise Rejected(RejectReason.UNAUTHENTICATED, "join token missing or wrong")
        wanted = registration.node_id.strip().lower()
        if wanted in self.registry and (
                certified or self.sessions.holds(wanted, registration.session)):
            return self._register(registration), self.sessions.issue(wanted)
        if wanted in self.registry:
            registration = dataclasses.replace(registration, node_id="")  # id taken
        for node_id in self.registry.expire(self.expire_after):
            self.sessions.forget(node_id)
        self.gate.admit_new(len(self.registry))
        client = self._register(registration)
        return client, self.sessions.issue(client.node_id)

    def _register(self, registration: Registration) -> Client:
        if self.max_samples is not None and registration.facts.num_samples > self.max_samples:
            registration = dataclasses.replace(registration, facts=dataclasses.replace(
                registration.facts, num_samples=self.max_samples))
        try:
            return self.registry.register(registration)
        except ValueError as error:
            raise Rejected(RejectReason.INVALID_REGISTRATION, str(error)) from None

    def authenticate(self, node_id: str, credential: str) -> Client:
        """The caller's client record; Rejected unless `credential` is its session."""
        client = self.registry.get(node_id)
        if client is None:
            raise Rejected(RejectReason.UNKNOWN_NODE, f"unknown node {node_id!r}: register first")
        self.sessions.check(node_id, credential)
        return client
