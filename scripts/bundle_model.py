"""Bundle a trained run's model with its card, as the package ships it.

    python scripts/bundle_model.py RUN_DIR NAME --summary "one line: what it is and its budget"

Copies ``RUN_DIR/model.safetensors`` to ``src/fundus_restore/weights/NAME.safetensors``
and ``RUN_DIR/model.json`` (the card ``train`` wrote) to ``NAME.json`` with the
summary replaced, after checking that the weights load and are finite.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

from fundus_restore.pretrained import BUNDLED_DIR, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("name")
    parser.add_argument("--summary", required=True)
    args = parser.parse_args()
    weights, card_path = args.run / "model.safetensors", args.run / "model.json"
    model = load_model(weights)
    if not all(math.isfinite(float(p.detach().abs().max())) for p in model.parameters()):
        raise SystemExit(f"{weights}: non-finite weights")
    card = json.loads(card_path.read_text())
    card["summary"] = args.summary
    shutil.copyfile(weights, BUNDLED_DIR / f"{args.name}.safetensors")
    (BUNDLED_DIR / f"{args.name}.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"bundled {args.name}: {card['architecture']}, {card['parameters']} parameters, task {card['task']}")


if __name__ == "__main__":
    main()
