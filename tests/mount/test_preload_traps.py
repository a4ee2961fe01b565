"""Register traps of the interposition library (docs/preload.md, "Register traps"): a C
program (tests/c/traps.c) maps a BAR whole and touches its register page with plain loads
and stores; each access reaches the device model through the SIGSEGV handler."""

from __future__ import annotations

import json
import os
import platform
import select
import signal
import subprocess
from pathlib import Path

import pytest

from support import REPO, build_c, node_by_ids, preload_env

SOURCE = REPO / "tests" / "c" / "traps.c"

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="register traps are x86-64 only")


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    return build_c(SOURCE, tmp_path_factory.mktemp("c") / "traps", "-O2")


def node(mount, vendor: int, device: int) -> str:
    """The device's node relative to the mount (the C program prefixes VFIOFS_MOUNT)."""
    return os.path.relpath(node_by_ids(mount, vendor, device), mount.path)


def showcase(mount) -> str:
    return node(mount, 0x1234, 0x5653)


def run(program: Path, mount, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), *args], env=preload_env(mount), capture_output=True, text=True, timeout=60)


def traced(program: Path, mount, device: str, region: str, *args: str):
    """Run the program with the mount's trace open; its result and its writes to ``region`` of
    ``device`` as (offset, size, value), in the order the model saw them."""
    fd = os.open(mount.node(".vfiofs/trace"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        done = run(program, mount, *args)
        events: list[dict] = []
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        # each write is traced before its pwrite returns: once the program exited, all are queued
        while poller.poll(0):
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            events += [json.loads(line) for line in chunk.splitlines()]
    finally:
        os.close(fd)
    name = device.rsplit("/", 1)[1]
    return done, [(e["offset"], e["size"], e["value"]) for e in events
                  if e["op"] == "write" and e.get("device") == name and e.get("region") == region]


def results(done: subprocess.CompletedProcess) -> dict[str, str]:
    assert done.returncode == 0, done.stderr + done.stdout
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def test_every_store_and_load_form_reaches_the_register_page(program, mount):
    done, writes = traced(program, mount, showcase(mount), "BAR1", "forms", showcase(mount))
    r = results(done)
    # each store reached the model once, in program order, with its exact size
    assert writes == [(0x100, 1, "0x11"), (0x101, 1, "0x22"), (0x102, 2, "0x3344"), (0x104, 4, "0x55667788"),
                      (0x108, 8, "0x102030405060708"), (0x120, 4, "0x99aabbcc"), (0x124, 4, "0xddeeff00"),
                      (0x130, 1, "0x5a"), (0x132, 2, "0x1234"), (0x134, 4, "0xdeadbeef"),
                      (0x138, 8, "0xfffffffffffffffe"), (0x0, 4, "0xfeedf00d")]
    # stores (88, 88 from AH, 66 89, 89, REX.W 89 from r9, SIB, disp32), as pread sees them
    assert (r["b"], r["bh"], r["w"], r["l"], r["q"]) == ("0x11", "0x22", "0x3344", "0x55667788", "0x102030405060708")
    assert (r["sib"], r["disp32"]) == ("0x99aabbcc", "0xddeeff00")
    # immediate stores: C6, 66 C7, C7, REX.W C7 (imm32 sign-extended to 64 bits)
    assert (r["imm8"], r["imm16"], r["imm32"], r["imm64"]) == ("0x5a", "0x1234", "0xdeadbeef", "0xfffffffffffffffe")
    # loads: 8- and 16-bit destinations keep the register's other bits, 32-bit ones zero-extend
    assert (r["load_b"], r["load_ah"], r["load_w"]) == ("0xffffffffffffff11", "0x5a00", "0xffffffffffff3344")
    assert (r["load_l"], r["load_q"]) == ("0x55667788", "0x102030405060708")
    assert (r["movzbl"], r["movzwq"], r["movsbq"]) == ("0xef", "0xbeef", "0xffffffffffffffef")
    # what a compiler emits for a volatile register: BAR1's queue_doorbell
    assert r["doorbell_pread"] == r["doorbell_load"] == "0xfeedf00d"
    # the sparse area is the memfd itself (no trap); the register page is the PROT_NONE reservation
    assert (r["ram_pread"], r["ram_mapping"], r["register_mapping"]) == ("0xa5a5a5a5", "memfd", "anonymous")
    assert r["munmap"] == "ok:0"


def test_ioat_driven_through_the_mapping(program, mount):
    """Two memcpys kicked by identical CHAINADDR and DMACOUNT stores, polled through CHANSTS."""
    ioat = node(mount, 0x8086, 0x2021)
    done, writes = traced(program, mount, ioat, "BAR0", "ioat", ioat)
    r = results(done)
    kick = [(0x80, 2, "0x1"), (0x90, 8, "0x100000"), (0x86, 2, "0x1")]  # INT_REARM, CHAINADDR, DMACOUNT
    assert writes == [(0x03, 1, "0x1")] + kick + kick
    assert (r["attach"], r["ioas_map"]) == ("ok:0", "ok:0")
    assert r["ver"] == "0x33" and r["chansts_power_on"] == "3"  # HALTED
    for n in (1, 2):
        assert (r[f"status{n}"], r[f"copied{n}"]) == ("1", "1")  # DONE, the destination holds the source
        assert r[f"attn{n}"] == "1,0"  # ATTNSTATUS: the first load reads the interrupt and clears it
    assert r["chanerr"] == "0" and r["munmap"] == "ok:0"


def test_faults_elsewhere_go_to_the_programs_own_handler(program, mount):
    r = results(run(program, mount, "chain", showcase(mount)))
    assert (r["chained"], r["after"], r["load_after"]) == ("1", "0x600d", "0x600d")


@pytest.mark.parametrize("how", ["rep_movsb", "readonly", "closed", "null"])
def test_what_cannot_be_forwarded_still_dies_with_sigsegv(program, mount, how):
    done = run(program, mount, "crash", showcase(mount), how)
    assert done.returncode == -signal.SIGSEGV, done.stderr + done.stdout
    assert "survived" not in done.stdout
    if how == "rep_movsb":
        assert "before=1" in done.stdout
        assert done.stderr.startswith("vfiofs: register access by an instruction it cannot decode: f3 a4")
    elif how == "closed":
        assert "before=1" in done.stdout
        assert done.stderr.startswith("vfiofs: register access after the device fd was closed:")
    elif how == "readonly":
        assert "load=0x0" in done.stdout  # a load on a read-only mapping is forwarded, a store is not
        assert done.stderr == ""
    else:
        assert done.stderr == ""
