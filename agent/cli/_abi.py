"""``vbox-agent abi [--json]``: print the ioctl numbers and struct layouts the agent uses.

The data is :func:`agent.protocol.abi.describe_abi`; ``--json`` prints it as one JSON
object with sorted keys, otherwise a table. The gcc ABI test compiles the same data
against the kernel headers.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from agent.cli._output import write_line
from agent.protocol.abi import AbiDescription, describe_abi

if TYPE_CHECKING:
    import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    """Give the ``abi`` parser its description, arguments and handler."""
    parser.description = (
        "Print the ioctl numbers and struct sizes and member offsets the agent encodes "
        "(64-bit userspace), with where each comes from (uapi, vmmdev, oracle)."
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object with sorted keys"
    )
    parser.set_defaults(handler=run)


def _natural(name: str) -> tuple[str, int]:
    """Sort ``MACRO(40)`` before ``MACRO(104)``."""
    macro, _, argument = name.partition("(")
    size = argument.rstrip(")")
    return macro, int(size) if size.isdigit() else -1


def format_table(abi: AbiDescription) -> str:
    """Return the readable table ``vbox-agent abi`` prints without ``--json``."""
    ioctl_sources = abi["sources"]["ioctls"]
    struct_sources = abi["sources"]["structs"]
    lines = ["ioctls:"]
    width = max(len(name) for name in abi["ioctls"])
    for name in sorted(abi["ioctls"], key=_natural):
        number = abi["ioctls"][name]
        lines.append(f"  {name:<{width}}  {number:#010x}  {ioctl_sources[name]}")
    lines.extend(["", "structs:"])
    for c_name in sorted(abi["structs"]):
        info = abi["structs"][c_name]
        lines.append(f"  struct {c_name} (size {info['size']}, {struct_sources[c_name]})")
        offsets = info["offsets"]
        member_width = max((len(path) for path in offsets), default=0)
        lines.extend(
            f"    @{offsets[path]:<5} {path:<{member_width}}"
            for path in sorted(offsets, key=lambda path: (offsets[path], path))
        )
    return "\n".join(line.rstrip() for line in lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Print the ABI description; always succeeds."""
    abi = describe_abi()
    if args.json:
        write_line(json.dumps(abi, indent=2, sort_keys=True))
    else:
        write_line(format_table(abi).removesuffix("\n"))
    return 0
