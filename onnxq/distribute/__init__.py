"""The calibration passes on Dask workers (optional: ``pip install "onnxq[distributed]"``).

``cluster`` opens a client (local worker processes for ``--workers N``, a running cluster for ``--scheduler``);
``passes`` runs a calibration pass over shards of the data on its workers and merges what they found. Without a
client every pass runs in this process, through the same per-shard code with the whole stream as one shard.
"""
