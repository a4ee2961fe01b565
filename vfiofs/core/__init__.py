"""The sans-I/O VFIO core: the handle state machine, the ioctl table, the mailbox."""
