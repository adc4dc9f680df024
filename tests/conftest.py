import jax
import pytest


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def x64():
    """Run a test with 64-bit types on, restoring the setting afterwards."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def strict_ranks():
    """jaxcheck itself must not rely on implicit rank promotion."""
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture
def strict_numerics():
    """What JAX's own test suite runs under (and equinox's: rank promotion raises too):
    jaxcheck must be dtype- and rank-explicit everywhere."""
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield
