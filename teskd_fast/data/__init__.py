"""teskd_fast.data."""
