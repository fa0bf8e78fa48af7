"""Record a registry component's input/output contract as the project's own data file.

The runner checks pipeline inputs offline (`dry_run=true`, explicit `finetune.*` keys) against a component
contract: the names, types, defaults, enums and bounds of the component's inputs, and its outputs. This script
writes that contract from either source a user has:

    # a spec from azureml-assets (assets/training/finetune_acft_hf_nlp/components/pipeline_components/...)
    python scripts/record_component.py spec.yaml
    # what the registry serves now
    az ml component show --registry-name azureml -n chat_completion_pipeline -o json > live.json
    python scripts/record_component.py live.json

The output (runner/azureml/components/<name>-<version>.yaml by default) keeps only the facts the runner reads;
descriptions and the `jobs` graph are left out. It loads with azure.ai.ml.load_component, so the dry run builds the
pipeline job from it exactly as the real run builds it from the registry's component. Point
`backend.component_spec=` at another recorded file to plan against another version.
"""

import argparse
import sys
from pathlib import Path

import yaml

INPUT_KEYS = ("type", "optional", "default", "enum", "min", "max", "mode")
OUTPUT_KEYS = ("type", "mode")
COMPONENTS_DIR = Path(__file__).resolve().parent.parent / "runner" / "azureml" / "components"


def contract(data: dict) -> dict:
    if "inputs" not in data:  # the REST shape of a component version
        data = (data.get("properties") or {}).get("componentSpec") or data
    if "inputs" not in data:
        raise SystemExit("not a component spec: no `inputs` mapping")

    def keep(decl, keys):
        return {k: v for k, v in (decl or {}).items() if k in keys}

    return {
        "$schema": "https://azuremlschemas.azureedge.net/latest/pipelineComponent.schema.json",
        "name": data["name"],
        "version": str(data["version"]),
        "type": "pipeline",
        "inputs": {name: keep(decl, INPUT_KEYS) for name, decl in data["inputs"].items()},
        "outputs": {name: keep(decl, OUTPUT_KEYS) for name, decl in (data.get("outputs") or {}).items()},
        "jobs": {},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="component spec YAML or an exported component (YAML/JSON)")
    parser.add_argument("--out", help="output file (default: runner/azureml/components/<name>-<version>.yaml)")
    args = parser.parse_args(argv)
    data = yaml.safe_load(Path(args.source).read_text(encoding="utf-8"))
    out_data = contract(data)
    out = Path(args.out) if args.out else COMPONENTS_DIR / f"{out_data['name']}-{out_data['version']}.yaml"
    header = (f"# The input/output contract of the azureml registry component {out_data['name']} "
              f"{out_data['version']},\n# recorded by scripts/record_component.py (names, types, defaults, enums, "
              f"bounds; no descriptions, no jobs).\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(out_data, sort_keys=False), encoding="utf-8")
    print(f"wrote {out} ({len(out_data['inputs'])} inputs, {len(out_data['outputs'])} outputs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
