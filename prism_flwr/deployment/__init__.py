"""Flower deployment-engine tooling on the node: the ClientApp processes (warm executor, checked
clientapp), the app-bundle check and the SuperNode wrapper. Flower internals only behind runtime_api."""
