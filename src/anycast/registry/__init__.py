"""The artifact registry: immutable, checksummed artifacts behind a storage interface."""

from anycast.registry.artifact import (
    FORMAT,
    MANIFEST,
    canonical,
    manifest_id,
    safe_member,
    sha256_file,
    verify_dir,
)
from anycast.registry.build import build_artifact
from anycast.registry.registry import Registry, read_artifact
from anycast.registry.storage import LocalStorage, RegistryStorage, Tag, open_storage

__all__ = [
    "FORMAT",
    "MANIFEST",
    "LocalStorage",
    "Registry",
    "RegistryStorage",
    "Tag",
    "build_artifact",
    "canonical",
    "manifest_id",
    "open_storage",
    "read_artifact",
    "safe_member",
    "sha256_file",
    "verify_dir",
]
