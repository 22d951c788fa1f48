"""The I/O side of a replica: what carries out the protocol core's actions for real.

The core (pbft/) is sans-I/O; this package touches disks, sockets and clocks. So far it
holds `runtime.storage`, the durable record store behind `Persist` actions; the trio
driver will live here too. Nothing in pbft/ may import this package.
"""
