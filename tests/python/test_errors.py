import pytest

import llmem
from llmem import BatchAllocator, BatchError, LlmemError, StateError


def test_hierarchy():
    assert issubclass(BatchError, LlmemError) and issubclass(BatchError, ValueError)
    assert issubclass(StateError, LlmemError) and issubclass(StateError, ValueError)
    assert not issubclass(LlmemError, ValueError)


def test_compiled_core_raises_the_python_classes():
    with pytest.raises(BatchError) as info:
        BatchAllocator(2).init(llmem.Batch(token=[1], seq_id=[5]))
    assert info.value.reason == "BAD_SEQ_ID"
    assert "5" in str(info.value)
    assert llmem._core.BatchError is BatchError


def test_batch_error_default_reason():
    assert BatchError("x").reason == "INVALID"
