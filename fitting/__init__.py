"""The optimization side of SPIN: body model, keypoints, cameras, priors, SMPLify, rendering.

Imports nothing from `trainer` or `pipeline`.
"""
