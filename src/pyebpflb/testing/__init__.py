"""What tests, the demo, benchmarks and notebooks build on, apart from the library's core:
:class:`~pyebpflb.testing.sandbox.Sandbox` (a client, a load balancer and backends in
network namespaces, with real servers) and the small servers it runs. Needs root and
iproute2; nothing in ``pyebpflb``'s core imports it.
"""
