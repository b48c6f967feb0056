import itertools

import pytest

import llmem
from llmem import Status, SWAType, status_combine, status_is_fail


def test_status_numbering_matches_llama_cpp():
    assert [int(s) for s in Status] == [0, 1, 2, 3]
    assert [s.name for s in Status] == ["SUCCESS", "NO_UPDATE", "FAILED_PREPARE", "FAILED_COMPUTE"]


def test_swa_type_numbering_matches_llama_cpp():
    assert {s.name: int(s) for s in SWAType} == {"NONE": 0, "STANDARD": 1, "CHUNKED": 2, "SYMMETRIC": 3}


@pytest.mark.parametrize("a,b", list(itertools.product(list(Status), repeat=2)))
def test_combine_rules(a, b):
    fails = {Status.FAILED_PREPARE, Status.FAILED_COMPUTE}
    if a in fails:
        expected = a
    elif b in fails:
        expected = b
    elif Status.SUCCESS in (a, b):
        expected = Status.SUCCESS
    else:
        expected = Status.NO_UPDATE
    assert status_combine(a, b) == expected
    assert status_is_fail(a) == (a in fails)


def test_combine_returns_the_enum():
    assert status_combine(Status.SUCCESS, Status.NO_UPDATE) is Status.SUCCESS
    assert isinstance(status_combine(Status.NO_UPDATE, Status.NO_UPDATE), Status)


@pytest.mark.parametrize("a,b", list(itertools.product(list(Status), repeat=2)))
def test_statuses_from_the_core_are_the_enum_members(a, b):
    # the core returns Status's member objects themselves (a table, not Status(value) per read):
    # identity, type and the IntEnum behaviour hold for every value
    got = status_combine(a, b)
    assert type(got) is Status and got is Status(int(got)) and got == int(got)


def test_context_status_is_the_member():
    import numpy as np
    cache = llmem.KVCache(1, 4, 4, 16, n_seq_max=2, dtype_k=np.float32, dtype_v=np.float32)
    ctx = cache.decode_step([0, 1])
    assert ctx.status is Status.SUCCESS and ctx._ctx.status is Status.SUCCESS
    full = cache.init_batch(llmem.Batch(token=np.zeros(40, np.int32)), 40)
    assert full.status is Status.FAILED_PREPARE


def test_public_names():
    for name in llmem.__all__:
        assert hasattr(llmem, name), name
    assert set(dir(llmem)) == set(llmem.__all__)
