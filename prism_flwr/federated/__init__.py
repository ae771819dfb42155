"""One federated round, framework-free: the client round, the methods, aggregation, the wire formats."""
