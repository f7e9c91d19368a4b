"""Search the loss weights that keep thin vessels: Optuna over channel and vessel weights.

The paper's next step: tune the green-weighted MSE's channel weights R:G:B and the
vessel weight (``loss.vessel_weight``, errors on vessels counted 1 + w times) for
what a grader needs, thin vessels, at no cost in fidelity. Every trial fine-tunes
the same starting model with the same data and budget (a config plus overrides),
validating with the vessel measures on (``validation.vessels``); the objective is
the validation thin-vessel recall plus thin-vessel contrast retention (centre crops,
both noise protocols), under the constraint that PSNR stays within ``psnr_tolerance``
of the baseline trial (the config's own weights, run first).

A stopped search resumes: the logged trials are replayed to the same seeded sampler
(which suggests the same weights again, without training), the interrupted trial's
run resumes from its checkpoint, and the search goes on as if it had not stopped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fundus_restore.io import write_file_atomically
from fundus_restore.train import CHECKPOINT, TrainingError, dotted_config, load_config, strict_json, train_from_config

PROTOCOLS = ("paper", "camera")


@dataclass(frozen=True)
class TrialResult:
    """One fine-tune of the search and its validation scores (centre crops, mean over protocols)."""

    number: int
    weights: tuple[float, float, float]
    vessel_weight: float
    psnr: float
    thin_recall: float
    thin_contrast_retention: float
    output: str

    @property
    def vessel_score(self) -> float:
        """Recall plus contrast retention; a measure with no thin vessel to measure on counts 0."""
        return sum(v if math.isfinite(v) else 0.0 for v in (self.thin_recall, self.thin_contrast_retention))


def _centre_mean(validation: Mapping[str, float | None], measure: str) -> float:
    """The mean over the protocols of a centre-crop measure; null (nothing to measure, e.g. no
    thin vessel) reads as NaN."""
    values = [validation[f"{measure}_{p}_centre"] for p in PROTOCOLS]
    return sum(math.nan if value is None else value for value in values) / len(values)


def run_trial(
    config: str | Path, overrides: Mapping[str, Any], number: int, output: Path,
    weights: tuple[float, float, float], vessel_weight: float,
    train: Callable[..., Path] = train_from_config,
    resume: bool = False,
) -> TrialResult:
    """Fine-tune with the given loss weights (``resume``: from the trial's checkpoint, where
    a stopped search left one); returns its validation scores."""
    trial_output = output / f"trial-{number:03d}"
    settings = {**overrides, "output": str(trial_output), "loss.weights": list(weights),
                "loss.vessel_weight": vessel_weight, "validation.vessels": True}
    train(config, overrides=settings, resume=resume and (trial_output / CHECKPOINT).exists())
    validation = json.loads((trial_output / "model.json").read_text(encoding="utf-8"))["validation"]
    return TrialResult(number, weights, vessel_weight, _centre_mean(validation, "psnr"),
                       _centre_mean(validation, "thin_recall"), _centre_mean(validation, "thin_contrast_retention"),
                       str(trial_output))


def search_loss_weights(
    config: str | Path,
    output: str | Path,
    *,
    trials: int,
    overrides: Mapping[str, Any] | None = None,
    psnr_tolerance: float = 0.1,
    seed: int = 0,
    timeout_minutes: float | None = None,
    resume: bool = False,
    train: Callable[..., Path] = train_from_config,
) -> list[TrialResult]:
    """Run the baseline (the config's weights, no vessel weighting) and ``trials`` Optuna
    trials, starting no trial once ``timeout_minutes`` have passed (for a fixed slot on a
    borrowed machine); writes ``OUTPUT/trials.jsonl`` and returns every result, baseline first.
    ``resume`` continues a stopped search in ``output`` (``trials`` counts its trials done)."""
    try:
        import optuna
    except ImportError:
        raise TrainingError("the loss search needs Optuna: pip install 'fundus-restore[search]'") from None
    output, overrides = Path(output), dict(overrides or {})
    if trials < 0 or psnr_tolerance < 0:
        raise TrainingError(
            f"the search needs trials >= 0 and psnr_tolerance >= 0, got {trials} and {psnr_tolerance:g}"
        )
    started = time.monotonic()  # the time limit counts the baseline too
    base = load_config(config, overrides)
    if base["data"]["targets"] != "clean":
        raise TrainingError("the loss search tunes a restoration model's loss, not a segmenter's")
    if len(base["loss"]["weights"]) != 3:  # the search space weighs green and blue against red
        raise TrainingError(f"the loss search weighs R, G and B; this config trains on {len(base['loss']['weights'])} "
                            "channel(s)")
    log = output / "trials.jsonl"
    logged = _search_so_far(output, {"config": base, "psnr_tolerance": psnr_tolerance, "seed": seed}, resume)

    def finished(number: int, weights: tuple[float, ...], vessel_weight: float) -> TrialResult:
        """Trial ``number``'s result: the logged one, or a new run's, logged."""
        if number < len(logged):
            result = logged[number]
            if (result.weights, result.vessel_weight) != (weights, vessel_weight):
                raise TrainingError(f"{log}: trial {number} was run with other weights than the sampler suggests "
                                    "now (another Optuna version?); start a new search")
            return result
        result = run_trial(config, overrides, number, output, weights, vessel_weight, train, resume)
        with log.open("a", encoding="utf-8") as handle:
            handle.write(strict_json(asdict(result)) + "\n")
        return result

    results = [finished(0, tuple(base["loss"]["weights"]), 0.0)]
    floor = results[0].psnr - psnr_tolerance

    def objective(trial: optuna.Trial) -> float:
        weights = (1.0, trial.suggest_float("green", 1.0, 6.0), trial.suggest_float("blue", 0.5, 4.0))
        vessel_weight = trial.suggest_float("vessel_weight", 0.0, 8.0)
        result = finished(trial.number + 1, weights, vessel_weight)
        results.append(result)
        trial.set_constraint("psnr_deficit", floor - result.psnr)  # feasible when <= 0: PSNR within tolerance
        return result.vessel_score

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    replayed = min(max(len(logged) - 1, 0), trials)  # logged trials take no time: outside the timeout
    study.optimize(objective, n_trials=replayed)
    timeout = None if timeout_minutes is None else max(60 * timeout_minutes - (time.monotonic() - started), 0.0)
    study.optimize(objective, n_trials=trials - replayed, timeout=timeout)
    return results


def _search_so_far(output: Path, settings: Mapping[str, Any], resume: bool) -> list[TrialResult]:
    """The trials a stopped search in ``output`` logged (none for a new search, whose folder is
    made); a new search is refused where one ran, and a resumed one whose settings changed."""
    record, log = output / "search.json", output / "trials.jsonl"
    settings = json.loads(strict_json(settings))  # as read back from the file
    if not resume:
        if record.exists() or log.exists():
            raise TrainingError(f"{output}: holds an earlier search; resume it (--resume) or choose another --out")
        output.mkdir(parents=True, exist_ok=True)
        record.write_text(strict_json(settings, indent=2) + "\n", encoding="utf-8")
        return []
    if not record.exists():
        older = " (the log there is from a version that kept no search.json: start a new search)" if log.exists() else ""
        raise TrainingError(f"{record}: no search to resume{older}")
    before = json.loads(record.read_text(encoding="utf-8"))
    was, now = dotted_config(before["config"]) | before, dotted_config(settings["config"]) | settings
    changed = sorted(key for key in {*was, *now} - {"config"} if was.get(key) != now.get(key))
    if changed:
        raise TrainingError(f"{output}: --resume continues the search as it was set up, but {', '.join(changed)} "
                            "changed; start a new search in another folder")
    lines = [line for line in (log.read_text(encoding="utf-8").splitlines() if log.exists() else []) if line.strip()]
    entries = []
    for index, line in enumerate(lines):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if index < len(lines) - 1:
                raise TrainingError(f"{log}: line {index + 1} is not a trial's record; start a new search") from None
            # The last line, cut short by a stop while it was written: that trial is run again (from its checkpoint).
            write_file_atomically(log, "".join(f"{kept}\n" for kept in lines[:-1]).encode("utf-8"))
    if any(entry["number"] != index for index, entry in enumerate(entries)):
        raise TrainingError(f"{log}: its trials are not numbered 0, 1, 2...; start a new search")
    return [_logged_result(entry) for entry in entries]


def _logged_result(entry: Mapping[str, Any]) -> TrialResult:
    """A ``TrialResult`` from its line of the log (null measures read back as NaN)."""
    measures = {key: math.nan if entry[key] is None else entry[key] for key in ("psnr", "thin_recall",
                                                                               "thin_contrast_retention")}
    return TrialResult(entry["number"], tuple(entry["weights"]), entry["vessel_weight"], output=entry["output"],
                       **measures)


def best_trial(results: list[TrialResult], psnr_tolerance: float = 0.1) -> TrialResult:
    """The trial with the best vessel score among those within ``psnr_tolerance`` of the baseline (results[0])."""
    feasible = [r for r in results if r.psnr >= results[0].psnr - psnr_tolerance]
    return max(feasible, key=lambda r: r.vessel_score)
