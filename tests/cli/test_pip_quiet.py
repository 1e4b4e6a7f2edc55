"""``scripts/pip_quiet.py`` (what ``make install`` runs pip through) drops only unactionable noise."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from ..conftest import ROOT

_spec = importlib.util.spec_from_file_location("pip_quiet", ROOT / "scripts" / "pip_quiet.py")
assert _spec is not None and _spec.loader is not None
pip_quiet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pip_quiet)

# pip 25 output with a pip configuration naming a missing index, and setuptools' notices
PIP_OUTPUT = """\
WARNING: Location 'file:///opt/pypi/simple/torch/' is ignored: it is neither a file nor a directory.
WARNING: Location 'file:///opt/pypi-more/simple/filelock/' is ignored: it is neither a file nor a directory.
  /tmp/pip-build-env-5mt97zit/overlay/lib/python3.11/site-packages/setuptools/config/_apply_pyprojecttoml.py:82: BuildBackendWarning: `project.license` as a TOML table is deprecated
  !!

          ********************************************************************************
          Please use a simple string containing a SPDX expression for `project.license`.
          ********************************************************************************

  !!
    corresp(dist, value, root_dir)
ERROR: Could not find a version that satisfies the requirement nosuchpackage
  /tmp/pip-build-env-5mt97zit/overlay/lib/python3.11/site-packages/setuptools/command/editable_wheel.py:354: BuildBackendWarning: Editable installation.
  !!

          ********************************************************************************
          Please be careful with folders in your working directory with the same
          name as your package as they may take precedence during imports.
          ********************************************************************************

  !!
    with strategy, WheelFile(wheel_path, "w") as wheel_obj:
WARNING: a warning a user can act on
"""


def test_filter_keeps_what_a_user_can_act_on() -> None:
    counts: dict[str, int] = {}
    kept = list(pip_quiet.filter_lines(PIP_OUTPUT.splitlines(keepends=True), counts))
    assert kept == [
        "ERROR: Could not find a version that satisfies the requirement nosuchpackage\n",
        "WARNING: a warning a user can act on\n",
    ]
    assert counts == {"locations": 2}


def test_makefile_installs_through_the_filter() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "PIP := $(PY) scripts/pip_quiet.py" in makefile
    assert "pip install" not in makefile.split("$(STAMP): pyproject.toml", 1)[1].split("install: $(STAMP)")[0]


def test_a_successful_install_with_missing_index_locations_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    # a real process printing what pip prints when the machine's configuration names missing indexes
    script = "import sys; sys.stdout.write(sys.argv[1])"
    assert pip_quiet.run([sys.executable, "-c", script, PIP_OUTPUT.split("  /tmp")[0]]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == ""  # no "pip skipped N package index location(s)" note either


def test_a_failing_install_shows_everything(capsys: pytest.CaptureFixture[str]) -> None:
    script = "import sys; sys.stdout.write(sys.argv[1]); sys.exit(3)"
    assert pip_quiet.run([sys.executable, "-c", script, PIP_OUTPUT]) == 3
    out, err = capsys.readouterr()
    assert "ERROR: Could not find a version" in out and PIP_OUTPUT in err and "failed (exit 3)" in err
