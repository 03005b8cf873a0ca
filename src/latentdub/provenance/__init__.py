"""Provenance: content credentials (C2PA), consent records, the audit log and watermarking."""
