"""How this process was invoked, as a shell line for provenance records."""

from __future__ import annotations

import shlex
import sys


def command_line() -> str:
    """``microscope <arguments>`` as typed (quoted for a shell), whatever started the process."""
    return "microscope " + " ".join(shlex.quote(a) for a in sys.argv[1:])
