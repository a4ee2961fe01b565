"""The daemon's side that touches the host: processes, fds, memfds, trio, mounts."""
