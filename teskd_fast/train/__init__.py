"""teskd_fast.train."""
