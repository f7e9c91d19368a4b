"""Bundle a trained run's model with its card, as the package ships it.

    python scripts/bundle_model.py RUN_DIR NAME --summary "one line: what it is and its budget" \
        [--validate-on PHOTO ...] [--half] [--calibrate]

Copies ``RUN_DIR/model.safetensors`` to ``src/fundus_restore/weights/NAME.safetensors``
and ``RUN_DIR/model.json`` (the card ``train`` wrote) to ``NAME.json`` with the
summary replaced, after checking that the weights load and are finite.

``--validate-on`` rescores the card's validation block on the given photographs (with
the run's validation crops, noise and seeds, on the CPU), for a run that was validated
on others: the bundled cards rank denoisers by it, so they must share one validation set.

``--half`` stores the weights in float16 (half the size; loading casts them back to
float32) and needs ``--validate-on``, so that the card scores the rounded weights.

``--calibrate`` re-centres a run trained in bfloat16 before ``train`` did so itself
(``fundus_restore.train.calibrate_output_bias`` on the run's ``calibration_patches``
fresh training patches) and records the shift in the card.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from fundus_restore.pretrained import BUNDLED_DIR, load_model, save_model
from fundus_restore.train import (
    Placement, Trainer, calibrate_on_training_data, card_validation, load_config, run_validation_crops, training_split,
)


def run_config(run: Path) -> dict[str, Any]:
    return load_config(run / "config.yaml", {"model.init_weights": str(run / "model.safetensors")})


def rescored_validation(run: Path, model: torch.nn.Module, photos: list[Path]) -> dict[str, Any]:
    """``model`` scored on ``photos`` as the run's training validated, in the card's layout."""
    config = run_config(run)
    crops = run_validation_crops(config, photos)
    trainer = Trainer(config, Placement(rank=0, world_size=1, device=torch.device("cpu")))
    return card_validation(config, trainer.validate(crops, model))


def calibrated(run: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Re-centre ``model`` on fresh patches of the run's training images; the card's record."""
    config = run_config(run)
    return calibrate_on_training_data(model, config, training_split(config)[0], config["steps"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=f"Writes NAME.safetensors and NAME.json into {BUNDLED_DIR}."
    )
    parser.add_argument("run", type=Path, help="A finished training run's folder (model.safetensors, model.json).")
    parser.add_argument("name", help="The bundled name the package will load it by.")
    parser.add_argument("--summary", required=True)
    parser.add_argument("--replace", action="store_true",
                        help="Replace the model bundled under NAME (refused without it); its task must stay the same.")
    parser.add_argument("--validate-on", type=Path, nargs="+", metavar="PHOTO")
    parser.add_argument("--calibrate", action="store_true", help="Re-centre a bfloat16-trained model for float32.")
    parser.add_argument("--half", action="store_true", help="Store float16 weights (needs --validate-on).")
    args = parser.parse_args()
    if args.half and not args.validate_on:
        parser.error("--half needs --validate-on: the card must score the weights as stored")
    weights, card_path = args.run / "model.safetensors", args.run / "model.json"
    model = load_model(weights)
    if not all(math.isfinite(float(p.detach().abs().max())) for p in model.parameters()):
        raise SystemExit(f"{weights}: non-finite weights")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    bundled_card = BUNDLED_DIR / f"{args.name}.json"
    if bundled_card.exists():
        # Other parts of the package load bundled models by name (evaluate's vessel segmenter, the defaults).
        if not args.replace:
            parser.error(f"{args.name} is bundled already: pass --replace to replace it")
        task = json.loads(bundled_card.read_text(encoding="utf-8")).get("task")
        if task != card.get("task"):
            parser.error(f"{args.name} is bundled as a {task!r} model; this run's is {card.get('task')!r}")
    card["summary"] = args.summary
    if args.calibrate:
        card["training"]["output_calibration"] = calibrated(args.run, model)
        card["config"] = model.config  # as the re-saved weights record it
    if args.half:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(parameter.half())  # scored below as it will be stored
    if args.validate_on:
        card["validation"] = rescored_validation(args.run, model, args.validate_on)
        card["training_data"]["validation_images"] = [p.name for p in args.validate_on]
    if args.calibrate or args.half:
        save_model(model.half() if args.half else model, BUNDLED_DIR / f"{args.name}.safetensors")
    else:
        shutil.copyfile(weights, BUNDLED_DIR / f"{args.name}.safetensors")
    (BUNDLED_DIR / f"{args.name}.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    print(f"bundled {args.name}: {card['architecture']}, {card['parameters']} parameters, task {card['task']}")


if __name__ == "__main__":
    main()
