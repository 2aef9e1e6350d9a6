"""Anomaly scoring at central (issue 15): reference sets, their memory banks, scores at ingest, alerts, reads.

- ``bank``: building a bank from a set's frames (greedy coreset, inverted lists, leave-one-out threshold); pure.
- ``refsets``: reference sets as rows: create, change, delete, list; the bank rebuilt in the same transaction.
- ``scoring``: the ingest hook (``Scorer``: score decoded messages, store the scores with the frames' batch,
  name the alerts) and the backfill of frames stored before a set existed.
- ``alerts``: publishing alerts on MQTT and to the optional webhook, never blocking ingest.
- ``queries``: what the API and the page read: frames by score, latest flagged per camera, a frame's anomalous
  region, frames like a region.

The scoring itself (and the bank file the edge loads) is the contract's: ``tokenline.anomaly``.
"""
