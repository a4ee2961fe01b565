"""Signalling and releasing the eventfds a driver registered with SET_IRQS.

The I/O half of interrupt delivery: vfio-pci (:mod:`vfiofs.pci`) decides *when* an
eventfd fires; these two functions are what the daemon injects to make it fire
(``VfioPciDevice(model, signal=signal, release=release)``). Signalling never blocks the
daemon and never raises: a trigger is the daemon's own descriptor, so a failure is a bug
to log, not something the driver could cause or handle.
"""

from __future__ import annotations

import logging
import os
import select
from typing import Protocol

log = logging.getLogger(__name__)


class Trigger(Protocol):
    """The daemon's own reference to an eventfd (an fd-passing channel's descriptor)."""

    fd: int

    def close(self) -> None: ...


def signal(trigger: Trigger) -> None:
    """Add 1 to the driver's eventfd. It is the driver's blocking eventfd (its flags are shared,
    so the daemon cannot make it non-blocking): a write to a counter at its maximum would block
    the daemon, so a saturated counter is left as it is (it cannot count higher anyway)."""
    try:
        writable = select.poll()  # poll, not select: the daemon's descriptors go past FD_SETSIZE
        writable.register(trigger.fd, select.POLLOUT)
        if not writable.poll(0):
            log.warning("eventfd %d is saturated; interrupt not counted", trigger.fd)
            return
        os.eventfd_write(trigger.fd, 1)
    except (OSError, ValueError) as exc:  # the descriptor is the daemon's own: this should not happen
        log.warning("cannot signal eventfd %d: %s", trigger.fd, exc)


def release(trigger: Trigger) -> None:
    """Drop the daemon's reference: the interrupt no longer goes to this eventfd."""
    trigger.close()
