"""Benchmarks of pyebpflb against kube-proxy's iptables and nftables modes (`make bench`)."""
