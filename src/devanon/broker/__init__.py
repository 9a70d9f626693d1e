"""The device for many processes: ``devanon serve`` and its clients.

A daemon owns named objects (memfds); clients open them by name, get the memfd over the
socket, map it themselves, and tell the daemon what they map. The daemon counts for all of
them, drops a client's counts when it dies, and punches every page nobody maps.
"""

from devanon.broker.client import BrokerError, Client, SharedAnon, SharedStats, connect
from devanon.broker.server import Daemon, DaemonRunning, default_socket_path

__all__ = [
    "BrokerError",
    "Client",
    "Daemon",
    "DaemonRunning",
    "SharedAnon",
    "SharedStats",
    "connect",
    "default_socket_path",
]
