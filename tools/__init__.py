"""Tools shared by the tests and the benchmarks: Flower processes on loopback, the security probe."""
