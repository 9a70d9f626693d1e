"""devanon: /dev/anon in userspace, memory that acts just like anonymous memory, except for
not being anonymous. See DESIGN.md for the contract."""

from typing import TYPE_CHECKING

from devanon.anon import PAGE_SIZE, Anon, AnonStats, Mapping, Overlay
from devanon.punch import PunchResult, punch_hole

if TYPE_CHECKING:
    from devanon.broker.client import BrokerError, Client, SharedAnon, connect

_BROKER = frozenset({"BrokerError", "Client", "SharedAnon", "connect"})
"""``devanon.connect`` and its kin, imported on first use (the broker's client doubles
the time ``import devanon`` takes)."""


def __getattr__(name: str) -> object:
    if name in _BROKER:
        from devanon.broker import client

        return getattr(client, name)
    raise AttributeError(f"module 'devanon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_BROKER})


__all__ = [
    "PAGE_SIZE",
    "Anon",
    "AnonStats",
    "BrokerError",
    "Client",
    "Mapping",
    "Overlay",
    "PunchResult",
    "SharedAnon",
    "connect",
    "punch_hole",
]
