"""The artifact registry: immutable, checksummed artifacts behind a storage interface."""
