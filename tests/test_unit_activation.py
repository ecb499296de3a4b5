"""The unit starts with the guest device: ``systemd/vbox-agent.service`` and its udev rule.

Rules of this test module:
- the shipped files are only read; ``systemctl --root`` enables the unit in ``tmp_path``;
- the device's node name comes from the agent's default device path and, where the kernel
  personality's build has them, from the real driver's sources.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Final

import pytest

from agent.config import DEFAULT_DEVICE
from tests.test_e2e import readme_block

SYSTEMD: Final = Path(__file__).parents[1] / "systemd"
UNIT: Final = SYSTEMD / "vbox-agent.service"
RULE: Final = SYSTEMD / "60-vbox-agent.rules"
NODE: Final = Path(DEFAULT_DEVICE).name
"""The node both drivers create: the kernel's misc device name."""
DEVICE_UNIT: Final = f"{DEFAULT_DEVICE.removeprefix('/').replace('/', '-')}.device"
"""systemd's unit for the node (``systemd-escape --path --suffix=device``: the path has no
character that needs escaping)."""
VBOXSERVICE_UNITS: Final = (
    "vboxadd-service.service virtualbox-guest-utils.service vboxservice.service"
)
"""Oracle's VBoxService: the Guest Additions' installer's unit, Debian's and Ubuntu's, Arch's."""


def unit_settings(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """Every ``KEY=VALUE`` of a unit file by section, values in file order."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = sections.setdefault("", {})
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key, []).append(value)
    return sections


_PAIR: Final = r'\s*([A-Z_]+(?:\{[^}]*\})?)\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*'
"""One ``KEY{attr}OP"value"`` of a udev rule."""


def rules(path: Path = RULE) -> list[dict[str, tuple[str, str]]]:
    """Each rule of a udev rules file as ``{key: (operator, value)}``."""
    parsed = []
    whole = re.compile(f"{_PAIR}(?:,{_PAIR})*")
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        assert whole.fullmatch(line), f"{path}: a rule this test cannot read: {line}"
        parsed.append({key: (op, value) for key, op, value in re.findall(_PAIR, line)})
    return parsed


def test_the_unit_starts_and_stops_with_the_device() -> None:
    """The agent is wanted by the device's unit (not by a boot target, where it raced a module
    that loads late), bound to it and ordered after it; it still runs only on VirtualBox."""
    settings = unit_settings()
    assert settings["Install"] == {"WantedBy": [DEVICE_UNIT]}
    assert settings["Unit"]["BindsTo"] == [DEVICE_UNIT]
    assert settings["Unit"]["After"] == [DEVICE_UNIT, VBOXSERVICE_UNITS]
    assert settings["Unit"]["ConditionVirtualization"] == ["oracle"]
    assert settings["Service"]["DeviceAllow"] == [f"{DEFAULT_DEVICE} rw"]


def test_the_unit_never_runs_beside_vboxservice() -> None:
    """Two guest agents on one VM undo each other's work: starting the agent stops Oracle's
    VBoxService under each of its unit names and starting one of those stops the agent
    (``Conflicts=``), the stop done first (``After=``); the install steps disable them."""
    settings = unit_settings()
    assert settings["Unit"]["Conflicts"] == [VBOXSERVICE_UNITS]
    assert VBOXSERVICE_UNITS in settings["Unit"]["After"]
    header = UNIT.read_text().partition("\n[Unit]")[0]
    names = " ".join(name.removesuffix(".service") for name in VBOXSERVICE_UNITS.split())
    assert f"#   systemctl disable --now {names} 2>/dev/null || true" in header.splitlines()


def test_the_rule_tags_the_node_both_drivers_create() -> None:
    """One rule tags the misc device ``vboxguest`` for systemd, on every action: systemd
    checks the current tag on every uevent, so with a rule limited to "add" a "change" event
    (a plain ``udevadm trigger``) would leave the device untagged, its unit dead, and the
    agent, bound to it, stopped."""
    assert rules() == [
        {"SUBSYSTEM": ("==", "misc"), "KERNEL": ("==", NODE), "TAG": ("+=", "systemd")}
    ]


def test_the_rule_names_the_real_driver_s_misc_device(kernel_library: Path) -> None:
    """The Linux driver the kernel personality builds registers its misc device under the name
    the rule matches (Oracle's driver uses the same name: VBoxGuest-linux.c's g_MiscDevice)."""
    # build.sh keeps the extracted sources in its cache, beside the build directories: there
    # whether it built the library for this run or for .ci/test, which names it in the environment.
    path = (
        kernel_library.parent.parent
        / "linux-source-6.12"
        / "drivers/virt/vboxguest/vboxguest_linux.c"
    )
    if not path.is_file():
        pytest.skip(f"{kernel_library} is a prebuilt library, without the driver's sources beside")
    source = path.read_text()
    (name,) = re.findall(r'#define DEVICE_NAME\s+"([^"]+)"', source)
    assert "misc_device.name = DEVICE_NAME;" in source
    [rule] = rules()
    assert rule["KERNEL"] == ("==", name)


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="needs systemctl")
def test_enabling_the_unit_links_it_into_the_device(tmp_path: Path) -> None:
    """``systemctl enable`` (as the README runs it) makes the device's unit want the agent,
    and no target: systemd then starts the agent whenever the device appears."""
    system = tmp_path / "etc/systemd/system"
    system.mkdir(parents=True)
    shutil.copy(UNIT, system)
    done = subprocess.run(
        ["systemctl", f"--root={tmp_path}", "enable", UNIT.name],  # noqa: S607 - from PATH
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    links = {
        str(link.relative_to(system)): os.readlink(link)
        for link in system.rglob("*")
        if link.is_symlink()
    }
    assert links == {f"{DEVICE_UNIT}.wants/{UNIT.name}": f"/etc/systemd/system/{UNIT.name}"}


def test_the_readme_installs_as_the_unit_says() -> None:
    """The README's install commands are the unit header's, the udev rule's install and the
    replayed "add" uevent included."""
    header = UNIT.read_text().partition("\n[Unit]")[0]
    commands = [
        line.removeprefix("#   ") for line in header.splitlines() if line.startswith("#   ")
    ]
    assert f"install -m 0644 systemd/{RULE.name} /etc/udev/rules.d/" in commands
    assert commands[-1] == (
        f"udevadm trigger --action=add --subsystem-match=misc --sysname-match={NODE}"
    )
    block = readme_block("The agent starts when the guest device does")
    assert block.splitlines() == commands
