"""The data room: locations and storage, the table schemas (samples, fits, quarantine), sample
images and crops, ingest of SPIN's datasets, and the synthetic benchmark with its CLI.

Imports only from `fitting` (and itself): `trainer` and `pipeline` build on it.
"""
