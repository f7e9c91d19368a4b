"""The loss-weight search: baseline first, Optuna trials after, every result logged."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fundus_restore.search import TrialResult, best_trial, search_loss_weights

pytest.importorskip("optuna")


def search_config(tmp_path: Path) -> dict:
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        image = np.full((96, 96, 3), 0.6) + rng.normal(0, 0.01, (96, 96, 3))
        image[20 + 20 * index : 22 + 20 * index, 10:86] -= 0.2  # a thin dark vessel
        Image.fromarray((image.clip(0, 1) * 255).astype(np.uint8)).save(photos / f"p{index}.png")
    return {
        "steps": 2, "batch_size": 2, "log_every": 1, "validate_every": 2, "checkpoint_every": 2,
        "model": {"architecture": "dncnn", "kwargs": {"depth": 3, "width": 8}},
        "data": {"train": [str(photos)], "patch_size": 16, "patches_per_image": 2, "workers": 0},
        "validation": {"holdout": 1, "crop": 64}, "loss": {"weights": [1, 3, 2]},
    }


def test_search_runs_the_baseline_then_the_trials_and_logs_them(tmp_path: Path) -> None:
    results = search_loss_weights(search_config(tmp_path), tmp_path / "search", trials=2)
    assert [r.number for r in results] == [0, 1, 2]
    assert results[0].weights == (1, 3, 2) and results[0].vessel_weight == 0.0
    assert all(r.weights[0] == 1.0 and 0 <= r.vessel_weight <= 8 for r in results[1:])
    # Standard JSON (a measure with nothing to measure is null), which strict parsers read too.
    strict = {"parse_constant": lambda name: pytest.fail(f"{name} in the log")}
    logged = [json.loads(line, **strict) for line in (tmp_path / "search" / "trials.jsonl").read_text().splitlines()]
    assert [entry["number"] for entry in logged] == [0, 1, 2]
    card = json.loads((tmp_path / "search" / "trial-002" / "model.json").read_text())
    assert card["recipe"]["loss"]["vessel_weight"] == results[2].vessel_weight
    assert "thin_contrast_retention_camera_centre" in card["validation"]


def test_a_search_past_its_timeout_starts_no_more_trials(tmp_path: Path) -> None:
    results = search_loss_weights(search_config(tmp_path), tmp_path / "search", trials=5, timeout_minutes=1e-9)
    assert [r.number for r in results] == [0]  # the baseline always runs; no trial starts after the timeout
    assert len((tmp_path / "search" / "trials.jsonl").read_text().splitlines()) == 1


def test_a_search_the_package_cannot_run_is_refused_before_its_baseline(tmp_path: Path) -> None:
    from fundus_restore.train import TrainingError

    config = search_config(tmp_path)
    with pytest.raises(TrainingError, match="the search needs trials >= 0 and psnr_tolerance >= 0, got -1 and 0.1"):
        search_loss_weights(config, tmp_path / "search", trials=-1)
    # Its space weighs green and blue against red: a grey model trained the baseline, then died on trial 1.
    grey = config | {"data": config["data"] | {"channels": [1]}, "loss": {"weights": [1]},
                     "model": {"architecture": "dncnn", "kwargs": {"depth": 3, "width": 8, "channels": 1}}}
    with pytest.raises(TrainingError, match=r"weighs R, G and B; this config trains on 1 channel\(s\)"):
        search_loss_weights(grey, tmp_path / "search", trials=1)
    assert not (tmp_path / "search").exists()


def test_best_trial_respects_the_psnr_tolerance() -> None:
    def result(number: int, psnr: float, recall: float) -> TrialResult:
        return TrialResult(number, (1, 3, 2), 0.0, psnr, recall, 0.5, "")

    results = [result(0, 36.0, 0.2), result(1, 35.8, 0.9), result(2, 35.95, 0.4)]
    assert best_trial(results).number == 2  # trial 1 loses 0.2 dB, more than the 0.1 allowed
    assert best_trial(results, psnr_tolerance=0.5).number == 1


def test_a_stopped_search_resumes_as_if_it_had_not_stopped(tmp_path: Path) -> None:
    from fundus_restore.train import TrainingError, train_from_config

    # Steps without a decay: a trial resumed from its checkpoint at step 2 ends as one run of 4 steps.
    config = search_config(tmp_path) | {"steps": 4, "schedule": {"decay": "none"}}
    whole = search_loss_weights(config, tmp_path / "whole", trials=3)

    def stopped_in_trial_2(config: dict, *, overrides: dict, resume: bool = False) -> Path:
        output = Path(overrides["output"])
        if output.name != "trial-002":
            return train_from_config(config, overrides=overrides, resume=resume)
        train_from_config(config, overrides=overrides | {"steps": 2})  # its checkpoint at step 2, then killed:
        (output / "model.safetensors").unlink()
        (output / "model.json").unlink()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search_loss_weights(config, tmp_path / "parts", trials=3, train=stopped_in_trial_2)
    assert len((tmp_path / "parts" / "trials.jsonl").read_text().splitlines()) == 2
    with pytest.raises(TrainingError, match="holds an earlier search; resume it"):
        search_loss_weights(config, tmp_path / "parts", trials=3)
    with pytest.raises(TrainingError, match="but steps changed; start a new search"):
        search_loss_weights(config | {"steps": 6}, tmp_path / "parts", trials=3, resume=True)
    with pytest.raises(TrainingError, match="no search to resume"):
        search_loss_weights(config, tmp_path / "none", trials=3, resume=True)

    # Stopped while trial 1's line was written: that line is cut short, and the finished trial's run is
    # resumed (its card written again from its checkpoint).
    log = tmp_path / "parts" / "trials.jsonl"
    log.write_text(log.read_text()[:-20])
    calls = []

    def counted(*args: object, **kwargs: object) -> Path:
        calls.append(Path(kwargs["overrides"]["output"]).name)
        return train_from_config(*args, **kwargs)

    resumed = search_loss_weights(config, tmp_path / "parts", trials=3, resume=True, train=counted)
    assert calls == ["trial-001", "trial-002", "trial-003"]  # the logged baseline is not run again
    # The same weights suggested and the same scores measured (NaN where no thin vessel is measured).
    np.testing.assert_equal([asdict(replace(r, output="")) for r in resumed], [asdict(replace(r, output="")) for r in whole])
    logged = [json.loads(line)["number"] for line in (tmp_path / "parts" / "trials.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 3]
