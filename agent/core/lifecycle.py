"""A job's life on this vehicle: one transition table that the journal and the events follow.

Stages a job held here passes through, and what moves it on:

    (arrives) --accepted--> ACCEPTED --running--> RUNNING --filed--> FILED --succeeded--> done
                               |                     |
                               +--released, failed, preempted--> done (the journal forgets it)

A job refused or handed back on arrival (`rejected`, `released`) was never held: it only
enters the replay record, which intake writes. `filed` is ours, not a wire event: the
result is sealed and in the outbox, and its journal entry closed in the same write.
`succeeded` is sent once the broker holds the result. `heartbeat` leaves the stage as it is.

Each transition names the journal's step, so the runtime writes what the table says and
nothing else: a pair that is not in the table is a bug, raised as LifecycleError.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from agent.wire.messages import EventKind


class Stage(StrEnum):
    ARRIVING = "arriving"  # verified and admitted, not yet held
    ACCEPTED = "accepted"
    RUNNING = "running"
    FILED = "filed"  # result sealed and in the outbox
    DONE = "done"


class Journal(StrEnum):
    """What the durable journal (agent.state.jobs.JobStore) does on a transition."""

    NOTHING = "nothing"
    MARK_RUNNING = "mark_running"
    FINISH = "finish"  # the entry goes: the job is no longer held
    FINISH_WITH_RESULT = "finish_with_result"  # goes, and its result enters the outbox


FILED = "filed"  # the internal happening behind Stage.FILED (no wire event)


@dataclass(frozen=True, slots=True)
class Step:
    to: Stage
    journal: Journal


class LifecycleError(Exception):
    """A happening the job's stage does not allow: a bug in the runtime, never the wire's."""


_ENDS = (EventKind.RELEASED, EventKind.FAILED, EventKind.PREEMPTED)

TRANSITIONS: Mapping[tuple[Stage, str], Step] = {
    # Intake: `accepted` is journalled by the replay write itself (JobStore.remember).
    (Stage.ARRIVING, EventKind.ACCEPTED): Step(Stage.ACCEPTED, Journal.NOTHING),
    (Stage.ARRIVING, EventKind.RELEASED): Step(Stage.DONE, Journal.NOTHING),
    (Stage.ARRIVING, EventKind.REJECTED): Step(Stage.DONE, Journal.NOTHING),
    (Stage.ACCEPTED, EventKind.RUNNING): Step(Stage.RUNNING, Journal.MARK_RUNNING),
    **{(Stage.ACCEPTED, kind): Step(Stage.DONE, Journal.FINISH) for kind in _ENDS},
    **{(Stage.RUNNING, kind): Step(Stage.DONE, Journal.FINISH) for kind in _ENDS},
    (Stage.RUNNING, FILED): Step(Stage.FILED, Journal.FINISH_WITH_RESULT),
    (Stage.FILED, EventKind.SUCCEEDED): Step(Stage.DONE, Journal.NOTHING),
    # A result that could not be sent is failed where it stands; its entry already went.
    (Stage.FILED, EventKind.FAILED): Step(Stage.DONE, Journal.NOTHING),
    **{
        (stage, EventKind.HEARTBEAT): Step(stage, Journal.NOTHING)
        for stage in (Stage.ACCEPTED, Stage.RUNNING)
    },
}


def advance(stage: Stage, happening: str) -> Step:
    """The next stage and the journal's step; LifecycleError for a pair the table lacks."""
    step = TRANSITIONS.get((stage, happening))
    if step is None:
        raise LifecycleError(f"a job {stage.value} cannot be {happening}")
    return step
