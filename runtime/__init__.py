"""The I/O side of a replica: the trio driver that carries out the protocol core's actions
for real on TCP, a disk and a clock.

`node` runs one replica process (its loop over the core), `transport` the authenticated,
encrypted links and their limits, `inbound` the fair scheduling of what peers send,
`storage` the durable record store behind `Persist`, `client` the payment client, `cluster`
the cluster file, `supervisor` and `localcluster` the processes of a local cluster. The
rest are tools over a running cluster: benchmarks (`bench*`), the standing adversary
(`attack`, `adversary`), the soak and input fuzzers. Imports: crypto and pbft only; nothing
in pbft/ or crypto/ imports this package.
"""
