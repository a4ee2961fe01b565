"""The interposition library's ioctl and mmap: a C program (tests/c/ioctls.c) drives a real
mount with plain ioctl(2)/mmap(2) under LD_PRELOAD, and prints what each call returned."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from support import REPO, build_c, preload_env, start_mount, stop_mount
from vfiofs.client import IommuFd, VfioDevice

SOURCE = REPO / "tests" / "c" / "ioctls.c"


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    return build_c(SOURCE, tmp_path_factory.mktemp("c") / "ioctls", "-O1")


def environment(mount) -> dict[str, str]:
    return preload_env(mount)


def parse(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


def run(program: Path, mount, case: str, *args: str) -> dict[str, str]:
    done = subprocess.run([str(program), case, *args], env=environment(mount), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr + done.stdout
    return parse(done.stdout)


def test_iommufd_requests(program, mount):
    r = run(program, mount, "iommufd")
    # a fresh device handle is blocked: everything but BIND is EINVAL
    assert r["info_unbound"] == "EINVAL" and r["unknown_unbound"] == "EINVAL"
    # BIND with the iommufd number inside the struct, and each bad input's errno
    assert r["bind_negative"] == "EINVAL"
    assert r["bind_short_argsz"] == "EINVAL"
    assert r["bind_foreign"] == "EBADFD"  # /dev/null
    assert r["bind_not_open"] == "EBADF"
    assert r["bind_device_as_iommufd"] == "EBADFD"
    assert r["bind"] == "ok:0" and r["devid"] == "1"
    assert r["bind_again"] == "EINVAL"
    assert r["api_version"] == "ok:0"
    assert r["ioas_alloc_short"] == "EINVAL"
    assert r["ioas_alloc"] == "ok:0" and int(r["ioas"]) >= 2
    assert r["ioas_alloc_null"] == "EFAULT"
    assert r["iommufd_unknown"] == "ENOTTY" and r["iommu_not_iommufd"] == "ENOTTY"
    assert r["attach_invalid"] == "ENOENT" and r["attach"] == "ok:0"
    assert (r["info"], r["info_flags"], r["num_regions"], r["num_irqs"]) == ("ok:0", "3", "9", "5")
    assert r["info_short_argsz"] == "EINVAL"
    assert r["info_bad_pointer"] == "EFAULT"
    assert (r["region_info"], r["region0_size"], r["region0_flags"], r["region0_offset"]) == ("ok:0", "65536", "7", "0")
    assert r["config_info"] == "ok:0" and r["config_offset"] == hex(7 << 40)
    assert r["region9_info"] == "EINVAL"
    assert r["irq_info"] == "ok:0" and r["msix_count"] == "0"  # ram-64k has no MSI-X
    assert r["unknown"] == "ENOTTY" and r["tty_request"] == "ENOTTY"
    assert r["reset"] == "ok:0"
    # IOVA_RANGES: EMSGSIZE with the needed count written back, then the ranges into our array
    assert r["iova_ranges_empty"] == "EMSGSIZE" and r["num_iovas"] == "1"
    assert r["iova_ranges"] == "ok:0" and r["range0"] == "0x0-0xffffffffffff" and r["iova_alignment"] == "4096"
    # IOAS_MAP of the program's own memory (its process proof), then UNMAP writes back the length
    assert r["ioas_map"] == "ok:0" and r["ioas_map_again"] == "EEXIST"
    assert r["ioas_map_unmapped"] == "EFAULT"
    assert r["ioas_unmap"] == "ok:0" and r["unmapped"] == "16384"
    assert r["detach"] == "ok:0"
    assert r["destroy"] == "ok:0" and r["destroy_again"] == "ENOENT"
    # other fds reach the real ioctl; a closed fd is EBADF
    assert r["pipe_fionread"] == "ok:0" and r["pipe_pending"] == "0"
    assert r["close_dev"] == "ok:0" and r["closed_fd"] == "EBADF"


def test_set_irqs_eventfds_and_loopback_trigger(program, mount):
    r = run(program, mount, "irqs", "vfio/devices/vfio2")  # showcase: 8 MSI-X vectors
    assert r["bind"] == "ok:0"
    assert r["set_irqs_closed_fd"] == "EBADF"
    assert r["set_irqs_not_eventfd"] == "EINVAL"
    assert r["set_irqs"] == "ok:0"
    assert r["read_before"] == "EAGAIN"  # no spurious interrupt
    assert r["trigger"] == "ok:0"
    assert r["read_vector1"] == "ok:8" and r["vector1_count"] == "1"
    assert r["read_vector0"] == "EAGAIN"
    assert r["set_irqs_short_argsz"] == "EINVAL"
    assert r["disable"] == "ok:0"


def test_dma_into_the_programs_own_buffer(program, models_mount):
    r = run(program, models_mount, "dma")
    assert r["bind"] == "ok:0" and r["attach"] == "ok:0" and r["ioas_map"] == "ok:0"
    assert r["to_memory_status"] == "0" and r["to_memory_match"] == "1"
    assert r["from_memory_status"] == "0" and r["from_memory_match"] == "1"
    assert r["unmapped_status"] == "1"  # a DMA fault, reported by the device
    assert r["set_irqs"] == "ok:0" and r["read_irq"] == "ok:8" and r["irq_count"] == "1"


def test_legacy_container_group_and_new_device_fd(program, mount):
    r = run(program, mount, "legacy")
    assert r["api_version"] == "ok:0"
    assert r["check_type1v2"] == "ok:1" and r["check_nesting"] == "ok:0"
    assert r["set_iommu_no_group"] == "EINVAL"
    assert r["group_status"] == "ok:0" and r["group_flags"] == "1"  # VIABLE
    assert r["set_container_foreign"] == "EBADFD"
    assert r["set_container_not_open"] == "EBADF"
    assert r["set_container_null"] == "EFAULT"
    assert r["set_container"] == "ok:0" and r["set_container_again"] == "EINVAL"
    assert r["device_fd_no_iommu"] == "EINVAL"
    assert r["set_iommu_bad_type"] == "ENODEV"
    assert r["set_iommu"] == "ok:0" and r["set_iommu_again"] == "EINVAL"
    assert r["iommu_info_small"] == "ok:0" and r["iommu_info_argsz_grew"] == "1"
    assert r["iommu_info"] == "ok:0" and r["iommu_info_caps"] == "2"
    assert r["nr_iovas"] == "1" and r["iova_range0"] == "0x0-0xffffffffffff"
    assert r["device_fd_wrong_name"] == "ENODEV"
    assert r["device_fd_null"] == "EFAULT"
    # the kernel's GET_DEVICE_FD returns a new O_CLOEXEC fd, usable at once
    assert r["device_fd"].startswith("ok:") and r["device_fd_new"] == "1" and r["device_fd_cloexec"] == "1"
    assert r["device_info"] == "ok:0" and r["device_regions"] == "9"
    assert r["device_bind"] == "EINVAL"  # a group-derived handle cannot BIND
    assert r["map_dma"] == "ok:0" and r["map_dma_again"] == "EEXIST"
    assert r["unmap_dma"] == "ok:0" and r["unmapped"] == "16384"
    assert r["map_dma_2"] == "ok:0" and r["unmap_all"] == "ok:0" and r["unmapped_all"] == "16384"
    assert r["close_device"] == "ok:0"
    assert r["unset_container"] == "ok:0" and r["unset_container_again"] == "EINVAL"


def test_whole_bar_mmap_at_a_fixed_address(program, mount):
    r = run(program, mount, "mmap")
    assert r["mmap_unbound"] == "EINVAL"
    assert r["fixed_address"] == "1"
    assert r["pread_sees_store"] == "0xc0ffee01"
    assert r["mapping_sees_pwrite"] == "0x12345678"
    assert r["part_sees_store"] == "0xc0ffee01" and r["munmap_part"] == "ok:0"
    assert r["mmap_private"] == "EINVAL"
    assert r["mmap_config"] == "EINVAL" and r["mmap_region9"] == "EINVAL" and r["mmap_beyond"] == "EINVAL"
    assert r["mmap_iommu"] == "ENODEV"
    assert r["munmap"] == "ok:0"


def test_dup_and_close_keep_fd_identity(program, mount):
    r = run(program, mount, "dup")
    assert r["bind_with_dup"] == "ok:0"  # a dup of the iommufd is the same handle
    assert r["dup2"] == "ok:100" and r["dupfd_cloexec"] == "ok:200"
    assert r["close_original"] == "ok:0"
    assert r["info_dup2"] == "ok:0" and r["info_dupfd"] == "ok:0"
    assert r["info_closed"] == "EBADF"
    assert r["dup2_pipe"] == "ok:100" and r["pipe_fionread"] == "ok:0"
    assert r["info_after_dup2_over"] == "ENOTTY"  # the pipe's own answer


def test_forked_child_binds_and_maps_its_own(program, mount):
    r = run(program, mount, "fork")
    assert r["parent_bind"] == "ok:0" and r["parent_attach"] == "ok:0"
    assert r["child_bind"] == "ok:0" and r["child_attach"] == "ok:0" and r["child_map"] == "ok:0"
    assert r["child_inherited_info"] == "ok:0" and r["child_inherited_map"] == "ok:0"
    assert r["child_status"] == "0"
    assert r["parent_unmap_child_mapping"] == "ok:0" and r["parent_map"] == "ok:0"


def test_child_killed_mid_request_leaves_the_daemon_serving(program, mount):
    r = run(program, mount, "kill")
    assert r["child_killed"] == "1"
    assert mount.alive()
    with IommuFd(mount.iommu) as iommu, VfioDevice(mount.device(0)) as dev:
        assert dev.bind_iommufd(iommu) == 1  # the killed child's binding is gone
        ioas = iommu.ioas_alloc()
        dev.attach_iommufd_pt(ioas)
        assert dev.get_info().num_regions == 9


def test_threads_share_an_fd_without_seeing_each_others_replies(program, mount):
    r = run(program, mount, "threads")  # 4 threads x 200 GET_REGION_INFO, each its own region index
    assert r["bind"] == "ok:0" and r["thread_mismatches"] == "0"


def test_finite_file_size_limit_is_efbig_not_sigxfsz(program, mount):
    r = run(program, mount, "fsize")  # exits 0: no SIGXFSZ killed it
    assert r["api_version_fsize"] == "EFBIG" and r["api_version_fsize_again"] == "EFBIG"


def test_daemon_gone_fails_each_call_without_hanging(program, tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount = start_mount(mountpoint)
    try:
        child = subprocess.Popen([str(program), "gone"], env=environment(mount), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "bind=ok:0"
        assert child.stdout.readline().strip() == "ready=1"
        mount.process.send_signal(signal.SIGKILL)
        mount.process.wait()
        out, _ = child.communicate("go\n", timeout=30)
        r = parse(out)
        assert child.returncode == 0
        assert r["info_gone"] == "ENODEV" and r["alloc_gone"] == "ENODEV" and r["mmap_gone"] == "ENODEV"
    finally:
        stop_mount(mount)
