"""The MRN stays out of flow-run names and tags (``mrn_in_run_names=False``), in-process and in
work-pool mode."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter

from blocks.folder import FolderTarget
from tests.cases import make_case
from tests.dispatch_env import DispatchEnv


def test_mrn_kept_out_of_run_names_and_tags(env: DispatchEnv, tmp_path: Path) -> None:
    """``mrn_in_run_names=False``: neither the run's name nor its tags carry the MRN."""
    from prefect import get_client

    env.save_settings(mrn_in_run_names=False)
    env.save_target(FolderTarget(folder=str(tmp_path / "share")), "share")
    case = make_case(env.outgoing, ["share"], mrn="MRN-SECRET-7", acc="ACC-77")
    assert env.dispatch(case)["location"] == "success"

    async def runs() -> list[Any]:
        from prefect.client.schemas.filters import FlowRunFilterTags
        from prefect.client.schemas.sorting import FlowRunSort

        async with get_client() as client:
            flt = FlowRunFilter(tags=FlowRunFilterTags(all_=[f"case:{case.name}"]))
            found = await client.read_flow_runs(
                flow_run_filter=flt, sort=FlowRunSort.ID_DESC, limit=10
            )
            return list(found)

    found = asyncio.run(runs())
    assert found, "the case run must be findable by its case tag"
    for run in found:
        assert "MRN-SECRET-7" not in run.name
        assert not any("MRN-SECRET-7" in tag for tag in run.tags), run.tags
        assert "acc:ACC-77" in run.tags


def test_work_pool_fan_out_keeps_the_mrn_out_of_queued_runs(env: DispatchEnv) -> None:
    """Work-pool mode: the runs the sweep queues for the workers honour ``mrn_in_run_names``."""

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.client.schemas.sorting import FlowRunSort

    from blocks.settings import DispatcherSettings
    from flows.dispatch import dispatch_case
    from flows.fanout import fan_out
    from flows.sweep import Dispatcher

    pool = "mrn-check"
    env.save_settings(mrn_in_run_names=False)
    case = make_case(env.outgoing, ["share"], mrn="MRN-SECRET-8", acc="ACC-78")

    async def queue_it() -> list[Any]:
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
            await client.create_work_queue(name="normal", work_pool_name=pool)
            flow_id = await client.create_flow(dispatch_case)
            deployment = await client.create_deployment(flow_id, pool, work_pool_name=pool)
        settings = await DispatcherSettings.aload("default")
        queued, _ = await fan_out(Dispatcher(settings), deployment)
        assert queued == 1
        async with get_client() as client:
            flt = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment]))
            runs = list(
                await client.read_flow_runs(flow_run_filter=flt, sort=FlowRunSort.ID_DESC, limit=10)
            )
            for run in runs:  # no worker will take them
                await client.delete_flow_run(run.id)
            return runs

    try:
        runs = asyncio.run(queue_it())
    finally:
        asyncio.run(remove_work_pool_deployments(pool))
    (run,) = runs
    assert f"case:{case.name}" in run.tags
    assert "acc:ACC-78" in run.tags
    assert "MRN-SECRET-8" not in run.name
    assert not any("MRN-SECRET-8" in tag for tag in run.tags), run.tags


async def remove_work_pool_deployments(pool: str) -> None:
    """Other tests' ``serve`` must find its deployments off the pool again."""
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName
    from prefect.client.schemas.sorting import DeploymentSort

    async with get_client() as client:
        for deployment in await client.read_deployments(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
            limit=50,
            sort=DeploymentSort.NAME_ASC,
        ):
            await client.delete_deployment(deployment.id)
        await client.delete_work_pool(pool)
