"""The Web UI browser check behind `make e2e` (see e2e/README.md)."""
