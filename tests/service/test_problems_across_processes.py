"""A problem raised in the inference process reaches the client as the same problem: class, status, type,
detail, Retry-After and the body's own members, whatever the subclass's constructor looks like (the reply
is the pickled dict the two processes exchange)."""

from __future__ import annotations

import pickle

import pytest

from models.core.errors import InferenceFailed, Overloaded, Problem
from models.core.layouts import SequenceError
from service.multiproc.front import raise_error
from service.multiproc.inference import error_fields


@pytest.mark.parametrize(
    "raised",
    [
        SequenceError("span 1 at 40: row 2 ends early", span=1, position=40),
        Overloaded("the queue would outlast the deadline", retry_after_s=3.5),
        InferenceFailed("the batch raised"),
    ],
)
def test_a_problem_crosses_the_process_boundary_whole(raised: Problem) -> None:
    reply = pickle.loads(pickle.dumps(error_fields(raised)))
    with pytest.raises(Problem) as info:
        raise_error(reply)
    got = info.value
    assert type(got) is type(raised) and (got.status, got.slug) == (raised.status, raised.slug)
    assert (got.detail, got.retry_after_s, got.extra) == (raised.detail, raised.retry_after_s, raised.extra)


def test_an_exception_that_is_no_problem_is_an_inference_failure() -> None:
    with pytest.raises(InferenceFailed):
        raise_error(pickle.loads(pickle.dumps(error_fields(RuntimeError("boom")))))
    with pytest.raises(InferenceFailed):  # a class name this process does not know
        raise_error({"err": "NoSuchProblem", "msg": "?"})
