"""The control plane: desired and observed state over a store with revisions and CAS."""

from anycast.control.client import ControlClient
from anycast.control.store import Record, SQLiteStore, Store, open_store

__all__ = ["ControlClient", "Record", "SQLiteStore", "Store", "open_store"]
