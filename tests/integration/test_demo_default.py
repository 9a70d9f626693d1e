"""The issue's 'must show', on the default workload, measured by the kernel (about 30 s).

The shipped trace of real programs starting up, replayed on this Python's stdlib: one
guest in mmap mode costs at least 90% of the distinct bytes read less than in copy mode;
with 8 guests each added mmap guest costs at most its other memory plus 10% of them; and
under the 1 GiB budget at least 1.25 times as many guests fit in mmap mode (the RFC's
figure), told by the OOM killer.
"""

from __future__ import annotations

import json

import pytest
from support import needs_root

from devanon.cli import main


@needs_root
def test_default_demo_meets_the_issue(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    checks = result["checks"]
    assert set(checks) == {
        "one_guest_mmap_le_copy_minus_90pct_distinct",
        "mmap_per_added_guest_le_other_plus_10pct_distinct",
        "density_ratio_ge_rfc",
    }
    assert all(c["ok"] for c in checks.values()), json.dumps(checks, indent=1)
    assert checks["density_ratio_ge_rfc"]["measured"]
    assert result["workload"]["default"] and result["workload"]["skipped_count"] == 0
    assert result["modes"]["mmap"]["guests"] == 8
    assert result["savings"] > 0.25
