"""Envoy's rate-limit API, the part quotagate serves (third_party/envoy-rls), generated; `make proto` regenerates (never edit)."""
