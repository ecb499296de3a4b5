"""The protocol layer matches the kernel ABI byte for byte, as gcc sees it.

Rules of this test module:

- One C probe is generated from ``describe_abi()`` and the layouts, compiled with gcc
  against the installed uapi headers (``linux/vboxguest.h``, ``linux/vbox_vmmdev_types.h``,
  ``linux/vbox_err.h``) plus ``c/vmmdev_mirror.h`` for driver-private and Oracle structs,
  and run once per module. Every struct size, member offset, member size and signedness,
  ioctl number and status code is compared with what the Python side says.
- Nothing is skipped: a missing gcc or missing headers fail the tests with a message that
  says what to install, because a skipped ABI test would hide a broken ABI.
- Coverage runs the other way too: every struct and fixed ioctl the uapi headers define
  must be described, and the header list comes from gcc's own dependency output.
- 32-bit userspace is not checked: gcc here has no 32-bit multilib headers
  (``asm/bitsperlong.h`` is missing under ``-m32``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agent.cli import _abi, main
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.abi import describe_abi, hgcm_call_sizes, vmmdev_request_sizes
from agent.protocol.balloon_pages import ChunkPages
from agent.protocol.constants import Ioctl, RequestType
from agent.protocol.messages import (
    ChangeMemBalloon,
    GuestHeartbeat,
    HgcmCall,
    HgcmU32,
    Log,
)
from agent.protocol.status import STATUS_CODES

if TYPE_CHECKING:
    from collections.abc import Callable

MIRROR_DIR = Path(__file__).parent / "c"
GCC_TIMEOUT_S = 60
"""Bound on one gcc run (a compile of the probe or of the header mirror)."""
UAPI_HEADERS = ("linux/vboxguest.h", "linux/vbox_vmmdev_types.h", "linux/vbox_err.h")
ABI = describe_abi()
LAYOUTS = {layout.c_name: layout for layout in L.ALL_LAYOUTS}
ARRAY_MEMBERS = frozenset(
    {("vmmdev_memballoon_change", "phys_page"), ("vmmdev_hgcm_pagelist", "pages")}
)
"""Members declared in Python as their first element: gcc checks ``member[0]``."""
STATUS_DEFINE = re.compile(r"^#define\s+(V(?:INF|ERR|WRN)_\w+)\s", re.MULTILINE)
STRUCT_DEFINITION = re.compile(r"^struct\s+(\w+)\s*\{", re.MULTILINE)
IOCTL_DEFINE = re.compile(r"^#define\s+(VBG_IOCTL_\w+)(\(\w+\))?\s+\\?\s*(_IO\w*)\(", re.MULTILINE)


def _fail(message: str) -> None:
    pytest.fail(message, pytrace=False)


def _gcc() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        _fail(
            "gcc is not installed: the ABI test compiles a probe against the kernel's uapi "
            "headers (apt-get install gcc linux-libc-dev)"
        )
    assert gcc is not None
    return gcc


def _run(argv: list[str], what: str) -> str:
    result = subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=GCC_TIMEOUT_S
    )
    if result.returncode != 0:
        hint = ""
        if "No such file" in result.stderr:
            hint = " (are the uapi headers installed? apt-get install linux-libc-dev)"
        _fail(f"{what} failed{hint}:\n{result.stderr}{result.stdout}")
    return result.stdout


@dataclass
class Probe:
    """What gcc says about the ABI."""

    sizes: dict[str, int] = field(default_factory=dict)
    offsets: dict[str, dict[str, int]] = field(default_factory=dict)
    members: dict[tuple[str, str], tuple[int, bool]] = field(default_factory=dict)
    ioctls: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    request_types: dict[str, int] = field(default_factory=dict)


def _header_paths(gcc: str) -> dict[str, Path]:
    """Return the uapi headers gcc actually includes, by include name."""
    source = "".join(f"#include <{name}>\n" for name in UAPI_HEADERS)
    argv = [gcc, "-M", "-x", "c", "-", "-o", "-"]
    result = subprocess.run(
        argv, input=source, capture_output=True, text=True, check=False, timeout=GCC_TIMEOUT_S
    )
    if result.returncode != 0:
        _fail(
            "gcc cannot find the vboxguest uapi headers (apt-get install linux-libc-dev):\n"
            + result.stderr
        )
    paths = [Path(word) for word in result.stdout.replace("\\\n", " ").split()[1:]]
    found: dict[str, Path] = {}
    for name in UAPI_HEADERS:
        matches = [path for path in paths if path.as_posix().endswith("/" + name)]
        if not matches:
            _fail(f"gcc did not report {name} among its dependencies: {result.stdout}")
        found[name] = matches[0]
    return found


def _member(c_name: str, path: str) -> str:
    return f"((struct {c_name} *)0)->{path}"


def _probe_source(status_names: list[str]) -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/vbox_err.h>",
        '#include "vmmdev_mirror.h"',
        "int main(void) {",
    ]
    for c_name, info in ABI["structs"].items():
        lines.append(f'  printf("S {c_name} %zu\\n", sizeof(struct {c_name}));')
        lines.extend(
            f'  printf("O {c_name} {path} %zu\\n", offsetof(struct {c_name}, {path}));'
            for path in info["offsets"]
        )
        for field_ in LAYOUTS[c_name].fields().values():
            member = _member(c_name, field_.c_path)
            if (c_name, field_.c_path) in ARRAY_MEMBERS:
                member += "[0]"
            if isinstance(field_, L.IntField):
                signed = f"(int)((__typeof__({member}))-1 < 0)"
            else:
                signed = "0"
            lines.append(
                f'  printf("F {c_name} {field_.c_path} %zu %d\\n", sizeof({member}), {signed});'
            )
    lines.extend(f'  printf("I {name} %lu\\n", (unsigned long)({name}));' for name in ABI["ioctls"])
    lines.extend(f'  printf("E {name} %ld\\n", (long)({name}));' for name in status_names)
    lines.extend(
        f'  printf("R {kind.name} %ld\\n", (long)(VMMDEVREQ_{kind.name}));' for kind in RequestType
    )
    lines.extend(["  return 0;", "}", ""])
    return "\n".join(lines)


def _parse(output: str) -> Probe:
    probe = Probe()
    for line in output.splitlines():
        kind, *words = line.split(" ")
        if kind == "S":
            probe.sizes[words[0]] = int(words[1])
        elif kind == "O":
            probe.offsets.setdefault(words[0], {})[words[1]] = int(words[2])
        elif kind == "F":
            probe.members[words[0], words[1]] = (int(words[2]), words[3] == "1")
        elif kind == "I":
            probe.ioctls[words[0]] = int(words[1])
        elif kind == "E":
            probe.statuses[words[0]] = int(words[1])
        elif kind == "R":
            probe.request_types[words[0]] = int(words[1])
    return probe


@pytest.fixture(name="headers", scope="module")
def fixture_headers() -> dict[str, str]:
    """The text of the installed uapi headers, by include name."""
    return {name: path.read_text() for name, path in _header_paths(_gcc()).items()}


@pytest.fixture(name="probe", scope="module")
def fixture_probe(tmp_path_factory: pytest.TempPathFactory, headers: dict[str, str]) -> Probe:
    """The probe's findings, compiled and run once for the module."""
    gcc = _gcc()
    status_names = STATUS_DEFINE.findall(headers["linux/vbox_err.h"])
    workdir = tmp_path_factory.mktemp("abi_probe")
    source = workdir / "probe.c"
    source.write_text(_probe_source(status_names))
    binary = workdir / "probe"
    _run(
        [
            gcc,
            "-std=gnu11",
            "-Wall",
            "-Werror",
            "-Wno-type-limits",
            "-I",
            str(MIRROR_DIR),
            str(source),
            "-o",
            str(binary),
        ],
        "compiling the ABI probe",
    )
    return _parse(_run([str(binary)], "running the ABI probe"))


class TestStructs:
    """Every layout against gcc's ``sizeof``/``offsetof``."""

    @pytest.mark.parametrize("c_name", sorted(ABI["structs"]))
    def test_size_and_offsets_match_gcc(self, probe: Probe, c_name: str) -> None:
        """The struct's size and every member offset equal gcc's."""
        info = ABI["structs"][c_name]
        assert probe.sizes[c_name] == info["size"]
        assert probe.offsets.get(c_name, {}) == info["offsets"]

    @pytest.mark.parametrize("c_name", sorted(ABI["structs"]))
    def test_member_sizes_and_signedness_match_gcc(self, probe: Probe, c_name: str) -> None:
        """Each declared member has the C member's size and signedness."""
        for field_ in LAYOUTS[c_name].fields().values():
            got_size, got_signed = probe.members[c_name, field_.c_path]
            if isinstance(field_, L.IntField):
                expected = (field_.codec.size, field_.codec.format[-1].islower())
                assert (got_size, got_signed) == expected, field_.c_path
            else:
                assert got_size == field_.size, field_.c_path

    def test_every_layout_is_described(self) -> None:
        """``describe_abi`` lists every layout of ``ALL_LAYOUTS`` exactly once."""
        assert sorted(ABI["structs"]) == sorted(LAYOUTS)
        assert len(LAYOUTS) == len(L.ALL_LAYOUTS)

    def test_uapi_structs_are_all_described(self, headers: dict[str, str]) -> None:
        """Every struct the uapi headers define appears in the description."""
        defined = set(STRUCT_DEFINITION.findall(headers["linux/vboxguest.h"]))
        defined |= set(STRUCT_DEFINITION.findall(headers["linux/vbox_vmmdev_types.h"]))
        assert defined
        assert defined <= set(ABI["structs"])

    def test_sources_name_the_defining_header(self, headers: dict[str, str]) -> None:
        """A struct is marked ``uapi`` exactly when the uapi headers define it."""
        defined = set(STRUCT_DEFINITION.findall(headers["linux/vboxguest.h"]))
        defined |= set(STRUCT_DEFINITION.findall(headers["linux/vbox_vmmdev_types.h"]))
        mirrored = set(STRUCT_DEFINITION.findall((MIRROR_DIR / "vmmdev_mirror.h").read_text()))
        sources = ABI["sources"]["structs"]
        assert {name for name, source in sources.items() if source == "uapi"} == defined
        assert {name for name, source in sources.items() if source != "uapi"} == mirrored


class TestIoctls:
    """Every ioctl number against the C macros."""

    @pytest.mark.parametrize("expression", sorted(ABI["ioctls"]))
    def test_number_matches_gcc(self, probe: Probe, expression: str) -> None:
        """The number equals the C expression's value."""
        assert probe.ioctls[expression] == ABI["ioctls"][expression]

    def test_fixed_uapi_ioctls_are_all_described(self, headers: dict[str, str]) -> None:
        """Every fixed ``VBG_IOCTL_*`` macro of the uapi header is in the description."""
        defines = IOCTL_DEFINE.findall(headers["linux/vboxguest.h"])
        fixed = {name for name, argument, _ in defines if not argument}
        assert "VBG_IOCTL_WAIT_FOR_EVENTS" in fixed
        assert fixed <= set(ABI["ioctls"])

    def test_sized_uapi_ioctls_the_agent_sends_are_described(self, headers: dict[str, str]) -> None:
        """Every sized macro except the 32-bit HGCM call appears with at least one size."""
        defines = IOCTL_DEFINE.findall(headers["linux/vboxguest.h"])
        sized = {name for name, argument, _ in defines if argument} - {"VBG_IOCTL_HGCM_CALL_32"}
        described = {expression.partition("(")[0] for expression in ABI["ioctls"]}
        assert "VBG_IOCTL_LOG" in sized
        assert sized <= described

    def test_sizes_come_from_the_messages(self) -> None:
        """The sized entries cover each VMMDev request below 1 KiB and 0..32 HGCM parameters."""
        assert vmmdev_request_sizes() == [24, 28, 32, 36, 40, 100]
        assert hgcm_call_sizes()[0] == 40
        assert hgcm_call_sizes()[-1] == 40 + 16 * 32
        for size in vmmdev_request_sizes():
            assert f"VBG_IOCTL_VMMDEV_REQUEST({size})" in ABI["ioctls"]
        for size in hgcm_call_sizes():
            assert ABI["ioctls"][f"VBG_IOCTL_HGCM_CALL({size})"] == Ioctl.hgcm_call_64(size)

    def test_encoded_requests_use_described_numbers(self) -> None:
        """Requests encode to the numbers the description lists for their size."""
        ioctls = ABI["ioctls"]
        assert GuestHeartbeat().encode().code == ioctls["VBG_IOCTL_VMMDEV_REQUEST(24)"]
        call = HgcmCall(7, 1, (HgcmU32(1), HgcmU32(2)))
        assert call.encode().code == ioctls["VBG_IOCTL_HGCM_CALL_64(72)"]
        assert Log(b"x" * 300).encode().code == ioctls["VBG_IOCTL_LOG(s)"]
        balloon = ChangeMemBalloon(inflate=True, pages=ChunkPages.of(range(4096, 4096 * 257, 4096)))
        assert balloon.encode().code == ioctls["VBG_IOCTL_VMMDEV_REQUEST_BIG"]

    def test_oracle_ioctl_is_marked(self) -> None:
        """Only Oracle's CHANGE_BALLOON is marked ``oracle``; the rest are ``uapi``."""
        sources = ABI["sources"]["ioctls"]
        assert {name for name, source in sources.items() if source != "uapi"} == {
            "VBGL_IOCTL_CHANGE_BALLOON"
        }
        assert sorted(sources) == sorted(ABI["ioctls"])


class TestStatusCodes:
    """``status.STATUS_CODES`` against ``linux/vbox_err.h``."""

    def test_every_header_code_is_known_with_its_value(
        self, probe: Probe, headers: dict[str, str]
    ) -> None:
        """Each ``VINF_``/``VERR_``/``VWRN_`` define is in ``STATUS_CODES`` with gcc's value."""
        names = STATUS_DEFINE.findall(headers["linux/vbox_err.h"])
        assert len(names) > 100
        assert {name: STATUS_CODES.get(name) for name in names} == probe.statuses


class TestRequestTypes:
    """``RequestType`` against ``enum vmmdev_request_type`` of ``linux/vbox_vmmdev_types.h``."""

    def test_every_request_type_has_the_header_value(self, probe: Probe) -> None:
        """Each member's value is gcc's ``VMMDEVREQ_<name>`` (the CPU hot-plug pair too)."""
        assert probe.request_types == {kind.name: int(kind) for kind in RequestType}
        assert probe.request_types["GET_CPU_HOTPLUG_REQ"] == 210
        assert probe.request_types["SET_CPU_HOTPLUG_STATUS"] == 211


def _run_abi_command(argv: list[str]) -> int:
    """Run the ``abi`` command through a parser holding only it."""
    parser = argparse.ArgumentParser(prog="vbox-agent")
    _abi.configure(parser.add_subparsers(dest="command", required=True).add_parser("abi"))
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


class TestCli:
    """``vbox-agent abi``."""

    def test_json_output_is_the_description(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``abi --json`` prints ``describe_abi()`` as JSON and exits 0."""
        assert main(["abi", "--json"]) == 0
        out = capsys.readouterr().out
        assert json.loads(out) == ABI

    def test_json_output_is_deterministic(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Two runs print the same bytes, with sorted keys."""
        _run_abi_command(["abi", "--json"])
        first = capsys.readouterr().out
        _run_abi_command(["abi", "--json"])
        assert capsys.readouterr().out == first
        assert first == json.dumps(json.loads(first), indent=2, sort_keys=True) + "\n"

    def test_table_lists_every_ioctl_and_struct(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The table names every ioctl with its hex number and every struct with its size."""
        assert _run_abi_command(["abi"]) == 0
        out = capsys.readouterr().out
        assert "VBG_IOCTL_WAIT_FOR_EVENTS" in out
        assert "0xc020560a" in out
        for c_name, info in ABI["structs"].items():
            assert f"struct {c_name} (size {info['size']}," in out
        assert out.index("VBG_IOCTL_HGCM_CALL(40)") < out.index("VBG_IOCTL_HGCM_CALL(104)")
