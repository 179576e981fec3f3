"""CONTIMG_EXECUTOR=dask://host:port runs the same stage functions on a Dask cluster."""

from pathlib import Path

import pytest

from conftest import group_files
from dsa110_contimg.conversion.convert import ConversionInputs
from dsa110_contimg.conversion.options import ConversionOptions
from dsa110_contimg.conversion.validate import check_uvh5_header
from dsa110_contimg.daemon.executor import DaskExecutor, make_executor
from dsa110_contimg.daemon.tasks import convert_and_check
from dsa110_contimg.errors import BadInputError
from dsa110_contimg.products import product_dir
from dsa110_contimg.qa.options import MSQAThresholds

distributed = pytest.importorskip("distributed")


async def test_stage_functions_run_on_a_local_dask_cluster(tiny_group, tmp_path):
    root, truth = tiny_group
    good = root / truth["files"][0]
    bad = tmp_path / "2026-06-01T00:00:00_sb00.hdf5"
    bad.write_bytes(b"not hdf5 at all")
    async with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                        dashboard_address=None, asynchronous=True) as cluster:
        address = "dask://" + cluster.scheduler_address.split("://", 1)[1]
        ex = await make_executor(address, 1, "INFO", "json")
        try:
            assert isinstance(ex, DaskExecutor) and "dask cluster" in ex.describe()
            assert await ex.run(check_uvh5_header, good, group_id=truth["group_id"]) is None
            reason = await ex.run(check_uvh5_header, bad)
            assert reason and "signature not found" in reason
            with pytest.raises(BadInputError, match="not a YYYY-MM-DDTHH:MM:SS"):
                await ex.run(product_dir, tmp_path, "../../etc")
            # a stage and its gate travel as one task and come back as a (result, verdict) pair
            inputs = ConversionInputs(truth["group_id"], tuple(group_files(root, truth)),
                                      tmp_path / "out", tmp_path / "scratch", Path("/dev/shm"))
            (res, qa), usage = await ex.run_measured(
                convert_and_check, inputs, ConversionOptions(publish_fsync=False),
                MSQAThresholds(), group_id=truth["group_id"])
            assert res.ms_path.exists() and qa.passed, qa.failures
            assert qa.metrics["ms"] == str(res.ms_path) and usage.cpu_s > 0
        finally:
            await ex.shutdown()
