"""Recipe schema: errors name the key path and the fix; overrides; built-ins."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnxq.errors import RecipeError, UsageError
from onnxq.recipe import builtin_names, load_recipe

REPO = Path(__file__).resolve().parents[1]


def test_builtin_int8_is_the_file_under_recipes() -> None:
    assert {"int8", "int8-dynamic"} <= set(builtin_names())
    by_name = load_recipe("int8")
    by_file = load_recipe(REPO / "recipes" / "int8.yaml")
    assert by_name == by_file
    assert [name for name, _ in by_name.pass_configs()] == [
        "upcast_fp16",
        "upgrade_opset",
        "simplify",
        "fold_batchnorm",
        "assign_precision",
        "insert_qdq",
        "cleanup",
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"calibraton": {}}, "recipe error at 'calibraton': unknown key 'calibraton'; did you mean 'calibration'?"),
        (
            {"calibration": {"num_sample": 3}},
            "at 'calibration.num_sample': unknown key 'num_sample'; did you mean 'num_samples'?",
        ),
        ({"calibration": {"num_samples": "many"}}, "at 'calibration.num_samples': input should be a valid integer"),
        ({"passes": [{"insert_qdk": {}}]}, "at 'passes[0]': unknown pass 'insert_qdk'; did you mean 'insert_qdq'?"),
        (
            {"passes": [{"insert_qdq": {"fuse_activation": True}}]},
            "at 'passes[0].insert_qdq.fuse_activation': unknown key 'fuse_activation'; "
            "did you mean 'fuse_activations'?",
        ),
        ({"defaults": {"weights": {"dtype": "int9"}}}, "at 'defaults.weights.dtype'"),
        ({"passes": [{"assign_precision": {"rules": [{"op_type": ["Conv"]}]}}]}, "did you mean 'op_types'?"),
    ],
)
def test_bad_recipes_name_path_and_fix(raw: dict, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_set_overrides_sections_and_passes() -> None:
    recipe = load_recipe(
        "int8", ["calibration.num_samples=7", "passes.upgrade_opset.target=17", "validate.gates.min_sqnr_db=25"]
    )
    assert recipe.calibration.num_samples == 7
    assert dict(recipe.pass_configs())["upgrade_opset"] == {"target": 17}
    assert recipe.validate_.gates.min_sqnr_db == 25


def test_set_on_a_pass_the_recipe_does_not_run() -> None:
    with pytest.raises(RecipeError, match="did you mean 'insert_qdq'"):
        load_recipe("int8", ["passes.insert_qdx.fuse_activations=false"])


def test_unknown_recipe_name_suggests_builtin() -> None:
    with pytest.raises(UsageError, match="did you mean 'int8'"):
        load_recipe("int88")


def test_passes_declared_out_of_order_are_refused(tmp_path: Path) -> None:
    from onnxq.pass_base import PassContext
    from onnxq.runner import build_passes

    recipe = load_recipe({"passes": [{"insert_qdq": {}}, {"assign_precision": {}}]})
    with pytest.raises(RecipeError, match="'insert_qdq' must run after 'assign_precision'"):
        build_passes(recipe, PassContext())


def test_every_builtin_recipe_validates() -> None:
    for name in builtin_names():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.passes
