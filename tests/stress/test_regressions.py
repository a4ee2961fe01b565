"""Reproducers of what the stress tests found, each kept as the regression test of its fix."""

from __future__ import annotations

import errno

from harness import Watchdog, crashes_in_log
from support import errno_of
from vfiofs import client as vc

TRIGGER_EVENTFD = vc.VFIO_IRQ_SET_DATA_EVENTFD | vc.VFIO_IRQ_SET_ACTION_TRIGGER


def test_set_irqs_naming_a_file_of_the_mount_as_its_eventfd_does_not_hang_the_daemon(mount):
    """R1 finding: the daemon closed the descriptor it was passed (not an eventfd) on its event
    loop; close() of a file of its own mount waits for the FLUSH that only that loop answers."""
    watchdog = Watchdog(mount)
    try:
        with mount.bound(0) as dev, vc.IommuFd(mount.iommu) as other, open(mount.node(".vfiofs/status")) as status:
            for fd in (other.fd, dev.fd, status.fileno()):
                with watchdog.op(f"SET_IRQS with fd {fd} of the mount as the eventfd"):
                    assert errno_of(dev.set_irqs, vc.VFIO_PCI_MSI_IRQ_INDEX, TRIGGER_EVENTFD, 0, data=[fd]) \
                        == errno.EINVAL
                with watchdog.op("GET_INFO after it"):
                    assert dev.get_info().num_regions == 9
    finally:
        watchdog.close()
    assert not crashes_in_log(mount)
