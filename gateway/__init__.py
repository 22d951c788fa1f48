"""The HTTP payment gateway (issue 12): an ASGI API over PaymentClient, with its own SQLite state.

Imports run crypto <- pbft <- runtime <- gateway <- cli; gateway never imports cli or sim.
"""
