"""Test helpers: seeded random Hessians and weights, slow reference implementations.

Used by the test suite only; ``caldera.testing.reference`` imports numpy and scipy, so it is not imported here.
"""

from caldera.testing.hessians import correlated_inputs, lowrank_plus_noise, random_spd_hessian

__all__ = ["correlated_inputs", "lowrank_plus_noise", "random_spd_hessian"]
