"""The start-up hooks of the child processes mmcorpus starts (pipelines/child-site/sitecustomize.py)."""

import subprocess
import sys

from mmcorpus.pipelines.runtime.childenv import child_env

WORKER_START = """
import logging
logging.warning("apitools not found, and bigquery client libraries are not available")  # Beam's import notice
logging.getLogger().setLevel(logging.INFO)  # what Beam's harness does while it starts
logging.getLogger("__main__").info("Logging handler created.")
logging.getLogger("worker").warning("a real warning")
logging.getLogger("worker").error("a real error")
"""


def run(code, env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


def test_quiet_worker_start_keeps_real_warnings_only():
    loud = run(WORKER_START, child_env())
    assert "apitools not found" in loud.stderr and "Logging handler created" in loud.stderr
    quiet = run(WORKER_START, child_env(MMCORPUS_QUIET_BEAM_WORKER="1"))
    assert "apitools" not in quiet.stderr and "Logging handler created" not in quiet.stderr
    assert quiet.stderr.splitlines() == ["a real warning", "a real error"]


def test_a_users_own_sitecustomize_still_loads(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['USER_SITE_HOOK'] = 'ran'\n")
    env = child_env({"PYTHONPATH": str(tmp_path), "PATH": ""}, MMCORPUS_QUIET_BEAM_WORKER="1")
    assert env["PYTHONPATH"].endswith(str(tmp_path))
    result = run("import os, urllib.request; print(os.environ.get('USER_SITE_HOOK'), urllib.request._opener)", env)
    assert result.stdout.split() == ["ran", "None"]  # no redirect hook unless asked for
