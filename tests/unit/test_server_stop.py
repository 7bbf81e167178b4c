"""A server whose gRPC stop hangs (grpc.aio can, after a cancelled stream) does not hang its process's shutdown."""

import asyncio
import logging

from specfleet.runtime import server


class _Stuck:
    stopped_with = None

    async def stop(self, grace):
        self.stopped_with = grace
        await asyncio.Event().wait()  # never returns


class _Quick:
    async def stop(self, grace):
        return None


def test_a_stop_that_hangs_is_given_its_grace_and_a_bounded_slack_then_left(monkeypatch, caplog):
    monkeypatch.setattr(server, "STOP_SLACK_S", 0.05)
    stuck = _Stuck()

    async def run():
        started = asyncio.get_running_loop().time()
        await server._bounded_stop(stuck, 0.1, "the test server")
        return asyncio.get_running_loop().time() - started

    with caplog.at_level(logging.WARNING, logger="specfleet"):
        took = asyncio.run(run())
    assert stuck.stopped_with == 0.1 and took >= 0.1
    assert any("the test server did not finish stopping" in r.getMessage() for r in caplog.records)


def test_a_stop_that_finishes_is_awaited_without_a_word(caplog):
    with caplog.at_level(logging.WARNING, logger="specfleet"):
        asyncio.run(server._bounded_stop(_Quick(), 5.0, "the test server"))
    assert not caplog.records
