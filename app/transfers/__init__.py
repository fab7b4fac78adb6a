"""The command side of the business center: one call per consumed record, split by question.

- ``ids``: the deterministic ids (transfer, attempt, token jti) and fingerprints.
- ``handling``: which record is being handled (context variables) and the tally of records
  set aside.
- ``intake``: ``business.commands`` in: decode, the reply cache, authenticate, a type →
  handler table.
- ``commands``: the handlers of transferInit, transferConfirm, topUp, verifyOtp and the
  queries.
- ``relay``: account and funding events forwarded to their saga's home partition.
- ``saga_inputs``: what arrives on a saga's home partition (relayed events, ticks,
  operators' resolutions).
- ``timers``: deadlines, the tick, the purge.
- ``steps``: one saga step applied, all or nothing.
- ``outbound``: every record the command side sends, as a ``schemas/`` model.
- the two tables it needs (sagas, saved replies) are ports in ``app/domain/ports.py``.
- ``service``: :class:`TransferService`, composing them.
"""
