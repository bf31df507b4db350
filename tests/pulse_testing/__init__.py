"""Test-only helpers shared by several test modules (not shipped in the library)."""
