"""The transport: gRPC servicers that convert proto <-> domain and map errors, nothing else."""
