"""quotagate: a gRPC quota-enforcement sidecar for AI products."""

__version__ = "0.1.0"
