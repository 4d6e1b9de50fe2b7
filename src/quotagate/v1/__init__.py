"""quotagate API stubs, generated; `make proto` regenerates (never edit)."""
