"""teskd_fast.models."""
