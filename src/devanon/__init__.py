"""devanon: /dev/anon in userspace, memory that acts just like anonymous memory, except for
not being anonymous. See DESIGN.md for the contract."""

from devanon.anon import PAGE_SIZE, Anon, AnonStats, Mapping, Overlay
from devanon.punch import PunchResult, punch_hole

__all__ = ["PAGE_SIZE", "Anon", "AnonStats", "Mapping", "Overlay", "PunchResult", "punch_hole"]
