"""The README's API example runs as written, and its quick start names the test command CI runs."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_api_example_runs():
    blocks = _python_blocks(README.read_text())
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    model = namespace["model"]
    assert model.logits.grad is not None and model.logits.grad[:, -2:].abs().sum() > 0
    assert namespace["outputs"]["seg"].shape == (2, 40, 9, 9)


def test_quick_start_has_two_commands_and_ci_runs_the_test_command():
    text = README.read_text()
    quick = re.search(r"## Quick start.*?```bash\n(.*?)```", text, flags=re.S).group(1).strip().splitlines()
    assert len(quick) == 2
    ci = (README.parent / ".ci" / "run").read_text()
    assert quick[1].replace("TRITON_INTERPRET=1 ", "") in ci
