"""Tickets for VFIO_GROUP_GET_DEVICE_FD: how a grant reaches the client's new handle.

The kernel's GET_DEVICE_FD returns a new fd. Here the group handle's ioctl opens the
device and answers with an unguessable ticket; the client opens the device node (a new,
blocked handle) and claims the ticket on it (docs/protocol.md §13). This module keeps
the mount-wide ticket table and its rules: a ticket is single-use, only the user who
opened the group handle may claim it, and the oldest unclaimed tickets lapse beyond
:data:`MAX_PENDING_GRANTS` (their grants are given back, closing the device they opened).
What a claim does to the handle is the state machine's (:mod:`vfiofs.core.handles`).
"""

from __future__ import annotations

import errno
import secrets
from collections import OrderedDict
from typing import Protocol

from vfiofs.errors import VfioError

#: Unclaimed tickets kept mount-wide (oldest lapse first), as many as a handle's reply slots.
MAX_PENDING_GRANTS = 1024


class Grant(Protocol):
    def lapse(self) -> None:
        """Never claimed: give back what the grant holds (the opened device)."""


class Claimant(Protocol):
    def claim(self, grant: Grant) -> None:
        """Become the handle the grant was issued for (device handles only)."""


class Tickets:
    """Ticket → (grant, uid of the group handle's opener)."""

    def __init__(self, limit: int = MAX_PENDING_GRANTS) -> None:
        self.limit = limit
        self._pending: OrderedDict[int, tuple[Grant, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def issue(self, grant: Grant, uid: int) -> int:
        """A fresh ticket for ``grant`` (46 random bits, odd: never 0)."""
        ticket = secrets.randbits(46) | 1
        self._pending[ticket] = (grant, uid)
        while len(self._pending) > self.limit:
            stale, _ = self._pending.pop(next(iter(self._pending)))
            stale.lapse()
        return ticket

    def claim(self, ticket: int, uid: int, handle: Claimant) -> None:
        """OP_CLAIM: the ticket is used up whatever follows; a wrong user is EINVAL. A grant
        whose ticket was used up without being claimed is given back at once (it could
        never be claimed any more)."""
        found = self._pending.pop(ticket, None)
        if found is None:
            raise VfioError(errno.EINVAL, "no such grant for this handle")
        grant, owner = found
        try:
            if owner != uid:
                raise VfioError(errno.EINVAL, "no such grant for this handle")
            handle.claim(grant)
        except BaseException:
            grant.lapse()
            raise
