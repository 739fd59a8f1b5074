"""Fault injection on the running pipeline (real Kafka broker, real tritonserver, every service a
process of its own): a camera stream goes on while a service is killed with SIGKILL and started
again, the broker is restarted, or tritonserver is frozen (SIGSTOP) for ten seconds — and afterwards
nothing the user was promised is lost or doubled (see :mod:`tests.e2e.fault_scenario` for the
scenario and the checks).

CI length: one fault per test, 30–50 s of media at 2x real time. ``SH_FAULTS_LONG=1`` (``make faults``):
real time, each fault three times in one stream, and a gateway kill as well.
"""

from __future__ import annotations

import logging
import os

import pytest

from streamharness.devinfra.stack import LocalStack
from tests.e2e.fault_scenario import Fault, Scenario, broker_restart, evidence, kill_and_restart, log_offsets, triton_pause

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
log = logging.getLogger(__name__)

LONG = os.environ.get("SH_FAULTS_LONG", "") not in ("", "0", "false")

FAULTS: list[Fault] = [
    *(kill_and_restart(name) for name in ("decision", "responder", "memory", "encoder", "ingest")),
    broker_restart(),
    triton_pause(10.0),
    *([kill_and_restart("gateway-1")] if LONG else []),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # Short answers keep a CPU-only run bounded. People walk in every 12 s of media time: a refractory
    # period well under that lets each walk-in fire, even one right after an alert the restart caused.
    with LocalStack(tmp_path_factory.mktemp("faults"), gateways=1,
                    extra_env={"SH_GENERATION_MAX_NEW_TOKENS": "16", "SH_DECISION_REFRACTORY_S": "5",
                               # People measured every 2 s of media (the default budget, 5 s, is for 10
                               # streams): the faults are under test, not the budget.
                               "SH_ENCODER_PEOPLE_EVERY_S": "2"}) as s:
        yield s


@pytest.fixture
def healthy_stack(stack):
    """The stack as a fault test found it: a service an earlier test left dead is started again
    (so that one failure does not cascade), a paused tritonserver is resumed."""
    stack.resume_triton()
    for proc in stack.procs:
        if proc.popen.poll() is not None:
            log.warning("%s had exited (%s) after an earlier test: starting it again", proc.name, proc.popen.returncode)
            stack.restart(proc.name)
    if not stack.broker.is_running():
        stack.broker.start()
    return stack


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_the_stream_survives(healthy_stack, fault):
    scenario = Scenario(healthy_stack, f"faults-{fault.name}", fault)
    if LONG:
        scenario.speed, scenario.media_s, scenario.repetitions = 1.0, 90, 3
    offsets = log_offsets(healthy_stack, fault)
    result = scenario.run()
    print(result.summary())  # the record of what happened, shown for passes too with -rP
    failures = result.failures()
    assert not failures, "\n".join([result.summary(), *(f"- {f}" for f in failures), evidence(healthy_stack, fault, offsets)])
