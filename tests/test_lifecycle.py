"""A job's lifecycle as one table (agent.core.lifecycle): what each happening does to the
stage and to the journal."""

from __future__ import annotations

import pytest

from agent.core.lifecycle import FILED, TRANSITIONS, Journal, LifecycleError, Stage, Step, advance
from agent.wire.messages import EventKind

ENDS = (EventKind.RELEASED, EventKind.FAILED, EventKind.PREEMPTED)


def test_the_happy_path_journals_running_then_the_result():
    assert advance(Stage.ARRIVING, EventKind.ACCEPTED) == Step(Stage.ACCEPTED, Journal.NOTHING)
    assert advance(Stage.ACCEPTED, EventKind.RUNNING) == Step(Stage.RUNNING, Journal.MARK_RUNNING)
    assert advance(Stage.RUNNING, FILED) == Step(Stage.FILED, Journal.FINISH_WITH_RESULT)
    assert advance(Stage.FILED, EventKind.SUCCEEDED) == Step(Stage.DONE, Journal.NOTHING)


@pytest.mark.parametrize("stage", [Stage.ACCEPTED, Stage.RUNNING])
@pytest.mark.parametrize("kind", ENDS)
def test_a_held_job_that_ends_leaves_the_journal(stage, kind):
    assert advance(stage, kind) == Step(Stage.DONE, Journal.FINISH)


@pytest.mark.parametrize("kind", [EventKind.REJECTED, EventKind.RELEASED])
def test_a_job_turned_away_on_arrival_was_never_journalled(kind):
    assert advance(Stage.ARRIVING, kind) == Step(Stage.DONE, Journal.NOTHING)


@pytest.mark.parametrize("stage", [Stage.ACCEPTED, Stage.RUNNING])
def test_a_heartbeat_changes_nothing(stage):
    assert advance(stage, EventKind.HEARTBEAT) == Step(stage, Journal.NOTHING)


def test_a_filed_result_that_cannot_be_sent_fails_without_a_second_journal_write():
    assert advance(Stage.FILED, EventKind.FAILED) == Step(Stage.DONE, Journal.NOTHING)


@pytest.mark.parametrize(
    ("stage", "happening"),
    [
        (Stage.ARRIVING, EventKind.RUNNING),  # never ran unaccepted
        (Stage.ARRIVING, EventKind.SUCCEEDED),
        (Stage.ARRIVING, FILED),
        (Stage.ACCEPTED, FILED),  # a result without running
        (Stage.ACCEPTED, EventKind.SUCCEEDED),
        (Stage.RUNNING, EventKind.SUCCEEDED),  # succeeded only once the broker holds it
        (Stage.RUNNING, EventKind.ACCEPTED),
        (Stage.FILED, EventKind.PREEMPTED),  # too late to preempt: the result is filed
        (Stage.DONE, EventKind.FAILED),
        (Stage.ACCEPTED, EventKind.REJECTED),
    ],
)
def test_what_the_table_lacks_is_a_bug_said_as_such(stage, happening):
    with pytest.raises(LifecycleError, match=f"a job {stage.value} cannot be {happening}"):
        advance(stage, happening)


def test_nothing_leaves_done_and_every_stage_is_reachable():
    assert not [key for key in TRANSITIONS if key[0] is Stage.DONE]
    reached = {step.to for step in TRANSITIONS.values()}
    assert reached >= {Stage.ACCEPTED, Stage.RUNNING, Stage.FILED, Stage.DONE}
