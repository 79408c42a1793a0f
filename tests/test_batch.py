import re
from pathlib import Path

from odb import StepInfo
from odb.planner import Reason

# Every StepInfo.reason a batch can carry: the planner's reasons and odb/rounds.py's ghost steps.
REASONS = {reason.value for reason in Reason} | {"ghost"}


def test_every_step_reason_is_documented_in_usage_and_the_docstring():
    usage = Path(__file__).parents[1] / "docs" / "usage.md"
    row = next(line for line in usage.read_text().splitlines() if line.startswith("| `reason`"))
    assert REASONS - set(re.findall(r"`(\w+)`", row)) == set()
    assert REASONS - set(re.findall(r"``(\w+)``", StepInfo.__doc__)) == set()
