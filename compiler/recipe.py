"""Recipes: which passes run, in order, with which settings.

A recipe is a YAML file (packaged ones live in ``onnxpress/recipes/``)::

    description: cleanup, then exact attention fusion
    passes:
      - cleanup
      - attention: {target: onnxruntime, optional: true}
      - prune_heads: {fraction: 0.33, only: encoder}

Two recipe-level keys sit beside a pass's settings (they are not pass settings):
``optional: true`` skips a pass that cannot apply to the model (no recognisable
attention) with a note in the report instead of failing, and ``only: encoder`` /
``only: decoder`` runs the pass only for that kind of model (decoders emit ``logits``).

On the command line the same is written ``--passes cleanup prune_heads:fraction=0.33,repair=true``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onnxpress.errors import OnnxpressError

RECIPE_DIR = Path(__file__).parent / "recipes"


MODEL_KINDS = ("encoder", "decoder")


@dataclass
class PassSpec:
    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    optional: bool = False  # skip (with a note) when the pass cannot apply, rather than fail
    only: str | None = None  # "encoder" / "decoder": run only for that kind of model

    def applies_to(self, kind: str) -> bool:
        return self.only is None or self.only == kind


@dataclass
class Recipe:
    name: str
    passes: list[PassSpec]
    description: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)  # defaults such as max_samples, max_length


def packaged_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = Path(name_or_path)
    if not path.suffix and (RECIPE_DIR / f"{name_or_path}.yaml").exists():
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise OnnxpressError(
            f"recipe {str(name_or_path)!r} is neither a packaged recipe nor a file: "
            f"use one of {', '.join(packaged_recipes())} or a path to a .yaml recipe"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise OnnxpressError(f"recipe {path} is not valid YAML{where}: fix the syntax") from None
    if not isinstance(data, dict) or not isinstance(data.get("passes"), list) or not data["passes"]:
        raise OnnxpressError(f"recipe {path} needs a non-empty 'passes:' list")
    return Recipe(
        name=path.stem,
        passes=[_spec_from_yaml(item, path) for item in data["passes"]],
        description=str(data.get("description", "")),
        calibration=dict(data.get("calibration") or {}),
    )


def _spec_from_yaml(item: Any, path: Path) -> PassSpec:
    if isinstance(item, str):
        return PassSpec(item)
    if isinstance(item, dict) and len(item) == 1:
        (name, settings), = item.items()
        if settings is None or isinstance(settings, dict):
            return _with_recipe_keys(str(name), dict(settings or {}), str(path))
    raise OnnxpressError(f"recipe {path}: each pass is a name or 'name: {{setting: value}}', got {item!r}")


def parse_pass_args(args: list[str]) -> Recipe:
    """``["cleanup", "prune_heads:fraction=0.33,repair=true"]`` -> a Recipe."""
    specs = []
    for arg in args:
        name, _, rest = arg.partition(":")
        settings: dict[str, Any] = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise OnnxpressError(f"--passes {arg!r}: settings are written name:key=value,key=value")
            settings[key.strip()] = yaml.safe_load(value)
        specs.append(_with_recipe_keys(name.strip(), settings, f"--passes {arg!r}"))
    return Recipe(name="command-line", passes=specs)


def _with_recipe_keys(name: str, settings: dict[str, Any], where: str) -> PassSpec:
    """Split the recipe-level keys (optional, only) from the pass's own settings."""
    optional = settings.pop("optional", False)
    only = settings.pop("only", None)
    if not isinstance(optional, bool):
        raise OnnxpressError(f"{where}: {name}: 'optional' must be true or false, got {optional!r}")
    if only is not None and only not in MODEL_KINDS:
        raise OnnxpressError(f"{where}: {name}: 'only' must be encoder or decoder, got {only!r}")
    return PassSpec(name, settings, optional=optional, only=only)
