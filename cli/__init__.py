"""The `pbft` command line: a thin shell around the simulator (sim/) and the runtime
(runtime/). Nothing imports it; it may import every other package of the repository.

main.py builds the parser and dispatches; one module per command family does the rest:
scenarios.py (run, sweep, fuzz), cluster.py (replica, cluster up), payments.py (pay,
balance), operations.py (authorize, capture, void, refund, open-account; ids.py reads and
prints their CLIENT:REQUEST ids), receipts.py (verify-receipt), keys.py (keygen); exits.py
holds the exit codes.
"""
