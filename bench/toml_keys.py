"""TOML reading cost of the costliest 1 MiB files whose keys keep within MAX_KEY_PARTS.

Python 3.11's tomllib takes time quadratic in a dotted key's parts and in a table header's
parts times the keys under it (``agent.tomlkeys``), so ``agent.tomltext`` refuses a key or
a header of more than ``MAX_KEY_PARTS`` parts before tomllib reads the text. This prints,
for each shape filled up to ``MAX_TOML_BYTES`` (1 MiB) with keys of ``--parts`` parts
(``MAX_KEY_PARTS`` unless given), the CPU time of ``tomllib.loads`` and of
``find_long_key`` (the check's own cost, which stops at the first key when ``--parts`` is
more than ``MAX_KEY_PARTS``), the least of ``--rounds`` rounds: CPU time, as
other processes on a shared machine disturb it far less than wall-clock time. The last
shapes have no dotted key at all: what 1 MiB costs tomllib whatever the limit. Then it
times ``parse_toml`` refusing one key of 20 000 parts (40 KB; tomllib took 8 s).

    python bench/toml_keys.py [--parts N] [--rounds N]
"""

from __future__ import annotations

import argparse
import functools
import time
import tomllib
from typing import TYPE_CHECKING, Final

from agent.tomlkeys import MAX_KEY_PARTS, find_long_key
from agent.tomltext import MAX_TOML_BYTES, TomlSyntaxError, parse_toml

if TYPE_CHECKING:
    from collections.abc import Callable

REFUSED_PARTS: Final = 20_000
MIN_PARTS: Final = 2
"""The fewest parts of the shapes' keys: each is dotted."""


def _dotted(parts: int, name: str = "a") -> str:
    return ".".join([name] * parts)


def _filled(head: str, line: Callable[[int], str]) -> str:
    """``head`` and then ``line(0)``, ``line(1)``, ... while the text stays within 1 MiB."""
    lines, size = [head], len(head)
    for number in range(MAX_TOML_BYTES):  # a line is one character at least
        text = line(number)
        if size + len(text) > MAX_TOML_BYTES:
            break
        lines.append(text)
        size += len(text)
    return "".join(lines)


def _shapes(parts: int) -> dict[str, str]:
    stem = _dotted(parts - 1)
    return {
        "a header, then one key, each of N parts": _filled(
            "", lambda n: f"[{stem}.x{n}]\n{stem}.k = 1\n"
        ),
        "an array table and a key of N parts": _filled(
            "", lambda n: f"[[{stem}.a]]\n{stem}.k = 1\n"
        ),
        "one header of N parts, keys of N parts": _filled(
            f"[{stem}.a]\n", lambda n: f"{stem}.k{n} = 1\n"
        ),
        "one header of N parts, keys of one": _filled(f"[{stem}.a]\n", lambda n: f"k{n} = 1\n"),
        "inline tables, keys of N parts": _filled("", lambda n: f"x{n} = {{{stem}.k = 1}}\n"),
        "(no dots) keys": _filled("", lambda n: f"k{n} = 1\n"),
        "(no dots) tables of one key": _filled("", lambda n: f"[t{n}]\nk = 1\n"),
        "(no dots) inline tables 100 deep": _filled(
            "", lambda n: f"x{n} = {'{a = ' * 100}1{'}' * 100}\n"
        ),
        "(no dots) array of integers": "a = [" + "1," * ((MAX_TOML_BYTES - 8) // 2) + "]\n",
    }


def _cpu_seconds(action: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        began = time.process_time()
        action()
        best = min(best, time.process_time() - began)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=MAX_KEY_PARTS)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.parts < MIN_PARTS:
        parser.error(f"--parts must be {MIN_PARTS} or more (a dotted key), not {args.parts}")
    if args.rounds < 1:
        parser.error(f"--rounds must be 1 or more, not {args.rounds}")
    print(f"keys of {args.parts} parts, {MAX_TOML_BYTES} bytes, CPU s (least of {args.rounds})")
    print(f"{'shape':42} {'tomllib':>8} {'check':>8}")
    for name, text in _shapes(args.parts).items():
        loads = _cpu_seconds(functools.partial(tomllib.loads, text), args.rounds)
        check = _cpu_seconds(functools.partial(find_long_key, text), args.rounds)
        print(f"{name.replace('N', str(args.parts)):42} {loads:8.3f} {check:8.3f}")

    refused = _cpu_seconds(functools.partial(_refuse, _dotted(REFUSED_PARTS) + " = 1\n"), 1)
    print(f"refusing a key of {REFUSED_PARTS} parts: {refused:.3f} s")


def _refuse(text: str) -> None:
    try:
        parse_toml(text)
    except TomlSyntaxError as exc:
        print(exc)
        return
    msg = "the text was read"
    raise AssertionError(msg)


if __name__ == "__main__":
    main()
