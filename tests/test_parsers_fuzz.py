"""Property tests: whatever bytes a config file, a run's ``run.json`` or ``metrics.jsonl`` holds, the
parser returns a value or raises one of our errors (one line for the user), never another
exception, a hang or a crash. Fixed seed and a bounded number of examples, so CI is repeatable."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from axs_lib.errors import AxsError
from axs_lib.run_dir import MetricsLog, read_run_json
from axs_lib.stage1.config import read_config_file

FUZZ = settings(derandomize=True, max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Bytes that look like the real thing often enough to get past the first parser check.
_texts = st.one_of(
    st.binary(max_size=400),
    st.text(max_size=200).map(str.encode),
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12)),
                 lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                 max_leaves=12).map(lambda v: repr(v).replace("'", '"').encode()),
    st.sampled_from([b"lr: 1e-3\nseed: 7\n", b'{"lr": "x"}', b"[" * 5000, b"a = [" * 3000, b"- " * 3000 + b"x",
                     b"steps = 1e999\n", b"seed: !!python/object:os.system x\n", b"\xff\xfe\x00"]),
)


@FUZZ
@given(data=_texts, suffix=st.sampled_from([".json", ".toml", ".yaml", ".yml", ".cfg"]))
def test_a_config_file_of_any_bytes_is_a_config_or_one_of_our_errors(tmp_path, data, suffix):
    path = tmp_path / f"exp{suffix}"
    path.write_bytes(data)
    try:
        config = read_config_file(path)
    except AxsError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
    else:
        assert isinstance(config, dict)


@FUZZ
@given(data=_texts)
def test_a_run_json_of_any_bytes_is_a_dict_none_or_one_of_our_errors(tmp_path, data):
    (tmp_path / "run.json").write_bytes(data)
    try:
        info = read_run_json(tmp_path)
    except AxsError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(info, dict)


@FUZZ
@given(data=_texts)
def test_a_metrics_log_of_any_bytes_reads_as_records_and_cuts_back(tmp_path, data):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(data)
    log = MetricsLog(path)
    assert all(isinstance(r, dict) for r in log.read())
    log.truncate_after(3)
    for record in log.read():  # a record without a step counts as step 0
        step = record.get("step", 0)
        assert isinstance(step, int) and not isinstance(step, bool) and step <= 3
