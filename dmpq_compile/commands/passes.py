"""dmpq-compile passes: list registered passes and backends (built-in and plugins)."""

from __future__ import annotations

import argparse

HELP = "list the registered passes and backends, with their options"


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    from ..backends import available_backends
    from ..passes import PASSES
    from ..passes.infra.base import options_doc

    print("passes:")
    for name, cls, origin in PASSES.items():
        req = ",".join(cls.requires) or "-"
        prov = ",".join(cls.provides) or "-"
        calib = " [calibration]" if cls.needs_calibration else ""
        print(f"  {name:<12} {cls.description}{calib}")
        print(f"  {'':<12} requires {req}; provides {prov}; options: {options_doc(cls) or '-'}; {origin}")
    print("backends:")
    for name, cls, origin in available_backends():
        print(f"  {name:<12} bits {cls.supported_bits}  {cls.description} ({origin})")
    return 0
