"""The domain: wallets, holds and their Redis scripts. No gRPC imports here."""
