from dataclasses import dataclass, field
from typing import Literal

import pytest

from onnxpress.errors import OnnxpressError
from onnxpress.pass_infra import PassConfig, available_passes, build_pass, get_pass
from onnxpress.recipe import load_recipe, packaged_recipes, parse_pass_args


@dataclass
class DemoConfig(PassConfig):
    pass_name = "demo"
    fraction: float = 0.25
    method: Literal["whitened", "plain"] = "whitened"
    include: list[str] = field(default_factory=lambda: ["ffn"])
    layers: int | None = None
    repair: bool = True

    def validate(self):
        if not 0 < self.fraction < 1:
            self.fail("fraction", "must be between 0 and 1, e.g. 0.25")


def test_config_coerces_recipe_and_command_line_values():
    cfg = DemoConfig.from_dict({"fraction": "0.5", "method": "plain", "include": "ffn.up|attn.q", "repair": "false"})
    assert (cfg.fraction, cfg.method, cfg.include, cfg.repair) == (0.5, "plain", ["ffn.up", "attn.q"], False)
    assert DemoConfig.from_dict({"fraction": 1 / 3, "layers": 2}).layers == 2
    assert DemoConfig.from_dict({"layers": None}).layers is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"fraction": 1.5}, "'fraction' must be between 0 and 1"),
        ({"fraction": "lots"}, "'fraction' must be a number"),
        ({"method": "magic"}, "'method' must be one of 'whitened', 'plain'"),
        ({"repair": "maybe"}, "'repair' must be true or false"),
        ({"layers": 1.5}, "'layers' must be an integer or null"),
        ({"fractoin": 0.2}, "unknown setting 'fractoin'; valid settings: fraction, include, layers, method, repair"),
    ],
)
def test_bad_config_values_are_one_line_errors(values, message):
    with pytest.raises(OnnxpressError) as info:
        DemoConfig.from_dict(values)
    assert message in str(info.value)
    assert str(info.value).startswith("demo: ") and "\n" not in str(info.value)


def test_registry_knows_cleanup_and_rejects_unknown_names():
    assert "cleanup" in available_passes()
    assert get_pass("cleanup").lossless
    with pytest.raises(OnnxpressError, match="unknown pass 'cleanpu'; available passes: .*cleanup"):
        build_pass("cleanpu")
    with pytest.raises(OnnxpressError, match="cleanup: 'fold_constants' must be true or false"):
        build_pass("cleanup", {"fold_constants": "perhaps"})


def test_recipes_from_packaged_names_files_and_command_line(tmp_path):
    assert "lossless" in packaged_recipes()
    assert load_recipe("lossless").passes[0].name == "cleanup"
    path = tmp_path / "r.yaml"
    path.write_text("passes:\n  - cleanup: {fold_constants: false}\n")
    assert load_recipe(path).passes[0].settings == {"fold_constants": False}
    recipe = parse_pass_args(["cleanup", "lowrank:fraction=0.2,include=ffn.up|ffn.down"])
    assert [(p.name, p.settings) for p in recipe.passes] == [
        ("cleanup", {}),
        ("lowrank", {"fraction": 0.2, "include": "ffn.up|ffn.down"}),
    ]


@pytest.mark.parametrize(
    "text, message",
    [("passes: [", "not valid YAML at line"), ("passes: []", "non-empty 'passes:' list"), ("passes:\n  - [1, 2]", "each pass is a name")],
)
def test_bad_recipes(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(OnnxpressError, match=message):
        load_recipe(path)
    with pytest.raises(OnnxpressError, match="neither a packaged recipe nor a file"):
        load_recipe("no-such-recipe")
