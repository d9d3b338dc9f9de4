"""Settings round-trip through JSON generically; unknown and missing keys are one-line errors."""

from __future__ import annotations

import json

import pytest

from destein_lens.attribution.study import StudySettings
from destein_lens.config_io import from_dict, to_dict
from destein_lens.errors import DesteinError
from destein_lens.generation import SamplingConfig
from destein_lens.models import LoadRecord
from destein_lens.steering import SteeringConfig

CONFIGS = [
    SteeringConfig(alpha=0.3, heads=[(1, 2), (0, 3)], positions="generated", form="iti"),
    SteeringConfig(heads=5),
    StudySettings(alpha=0.2, form="destein-gated", selection_ks=(1, 3), eval_rankers=("causal",)),
    SamplingConfig(do_sample=True, top_p=0.9, n=3, seed=7),
    LoadRecord(
        "m", "huggingface", None, "raw", "float32", "Llama", 2, 4, 16, 64, (("torch", "2"), ("tl", "4"))
    ),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_configs_round_trip_through_json(config) -> None:
    data = json.loads(json.dumps(to_dict(config)))
    again = from_dict(type(config), data)
    assert again == config
    assert to_dict(again) == data


def test_the_load_record_keeps_its_versions_as_a_json_object() -> None:
    record = CONFIGS[-1]
    assert record.to_dict()["versions"] == {"torch": "2", "tl": "4"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"alpha": 0.1, "colour": "red"}, "unknown steering settings: colour"),
        ({"alpha": "strong"}, "alpha must be a finite number"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_steering_records_are_one_line_errors(data, message: str) -> None:
    with pytest.raises(DesteinError, match=message):
        SteeringConfig.from_dict(data)


def test_a_missing_required_key_is_named() -> None:
    with pytest.raises(DesteinError, match="missing do_sample"):
        from_dict(SamplingConfig, {"n": 2})


def test_the_run_folders_eval_entry_round_trips() -> None:
    from destein_lens.evaluation import EvalConfig, eval_config

    config = eval_config(3, seed=5, max_new_tokens=7, batch_size=2, scorer="bilstm-jigsaw")
    data = json.loads(json.dumps(config.to_dict()))
    assert EvalConfig.from_dict(data) == config
    with pytest.raises(DesteinError, match="unknown evaluation settings: colour"):
        EvalConfig.from_dict({**data, "colour": 1})
