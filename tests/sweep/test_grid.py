"""The grid file: cells, stable ids, and bad grids refused before anything runs (naming key and value)."""
import pytest

from dfmpc_deploy.core.config import BitsSpec
from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.sweep.grid import GridError, build_config, cell_id, load_grid
from tests.conftest import CIFAR_TEST, R20_WEIGHTS, needs_shared
from tests.sweep.helpers import R20, grid_text, write_grid

RANDOM = {"name": R20, "weights": "random"}


def _load(tmp_path, *args, **kw):
    return load_grid(write_grid(tmp_path / "grid.toml", *args, **kw))


def test_cells_are_the_cross_product_per_model(tmp_path):
    g = _load(tmp_path, [RANDOM, {"name": "resnet32_cifar10_optA", "weights": "random"}],
              {"method": ["rtn", "dfmpc"], "bits": ["2/6", "4"], "seed": [0, 1]}, {"synth_steps": 5})
    assert len(g.cells) == 2 * 2 * 2 * 2 and g.axes == ("method", "bits", "seed")
    assert len({c.id for c in g.cells}) == len(g.cells)
    first = g.cells[0]
    assert first.model == R20 and dict(first.point) == {"method": "rtn", "bits": "2/6", "seed": 0}
    assert first.settings["synth_steps"] == 5 and first.settings["weights"] == "random"
    assert first.label() == "method=rtn bits=2/6 seed=0" and first.cpus == 1 and first.gpus == 0
    assert [c.model for c in g.cells[8:]] == ["resnet32_cifar10_optA"] * 8


def test_ids_depend_on_settings_only_not_on_order(tmp_path):
    a = _load(tmp_path, [RANDOM], {"method": ["rtn", "dfq"], "seed": [0]}, {"synth_steps": 5})
    b = load_grid(write_grid(tmp_path / "b.toml", [{"weights": "random", "name": R20}],
                             {"seed": [0], "method": ["dfq", "rtn"]}, {"synth_steps": 5}))
    assert {c.id for c in a.cells} == {c.id for c in b.cells}
    assert all(c.id == cell_id(c.settings) for c in a.cells)
    c = load_grid(write_grid(tmp_path / "c.toml", [RANDOM], {"method": ["rtn", "dfq"], "seed": [0]},
                             {"synth_steps": 6}))
    assert not {x.id for x in a.cells} & {x.id for x in c.cells}  # any changed setting is another cell


def test_a_grown_grid_keeps_the_ids_of_its_old_cells(tmp_path):
    old = _load(tmp_path, [RANDOM], {"method": ["rtn"], "seed": [0, 1]})
    new = load_grid(write_grid(tmp_path / "new.toml", [RANDOM], {"method": ["rtn", "dfq"], "seed": [0, 1]}))
    assert {c.id for c in old.cells} < {c.id for c in new.cells}


@needs_shared
def test_relative_paths_are_read_from_the_grid_file_folder(tmp_path, monkeypatch):
    sub = tmp_path / "g"
    sub.mkdir()
    (tmp_path / "w.th").symlink_to(R20_WEIGHTS)
    (tmp_path / "test").symlink_to(CIFAR_TEST)
    monkeypatch.chdir(sub.parent.parent)  # not the grid's folder
    g = load_grid(write_grid(sub / "grid.toml", [{"name": R20, "weights": "../w.th", "data": "imagefolder:../test"}],
                             {"seed": [0]}))
    assert g.cells[0].settings["weights"] == str(tmp_path / "w.th")
    assert g.cells[0].settings["data"] == f"imagefolder:{tmp_path / 'test'}"


def test_build_config_is_what_build_makes_of_the_same_flags(tmp_path):
    g = _load(tmp_path, [RANDOM], {"bits": ["3/6"], "per_channel": [True], "target": ["onnx,ort"]},
              {"synth_steps": 4, "no_pack": True, "batch_sizes": [1, 8]})
    cfg = build_config(g.cells[0].settings, tmp_path / "cell", threads=3)
    assert cfg.model == R20 and cfg.weights == "random" and cfg.out == tmp_path / "cell" and cfg.force
    assert cfg.targets == ("onnx", "ort") and cfg.batch_sizes == (1, 8) and cfg.pack is False and cfg.threads == 3
    assert cfg.settings == {"bits": BitsSpec(3, 6), "per_channel": True, "synth_steps": 4}


def test_threads_in_the_grid_are_the_cells_cpus(tmp_path):
    g = _load(tmp_path, [RANDOM], {"seed": [0]}, {"threads": 2, "device": "cpu"})
    assert g.cells[0].cpus == 2 and build_config(g.cells[0].settings, tmp_path / "c", threads=1).threads == 2


@pytest.mark.parametrize(("grid", "build", "needle"), [
    ({"sed": [0]}, {}, "[grid] sed: unknown build flag; did you mean seed or std?"),
    ({"seed": [0]}, {"synth_step": 5}, "[build] synth_step: unknown build flag; did you mean synth_steps"),
    ({"bits": ["2/6", "9/2"]}, {}, "[grid] bits = \"9/2\": bad --bits '9/2'"),
    ({"method": ["rtn", "magic"]}, {}, "bad --method 'magic'"),
    ({"seed": [0, -1]}, {}, "[grid] seed = -1: '-1' is not an integer"),
    ({"limit": [0]}, {}, "[grid] limit = 0: '0' is not a positive integer"),
    ({"synth_steps": ["many"]}, {}, "[grid] synth_steps = \"many\": 'many' is not an integer"),
    ({"rounding": ["best"]}, {}, "[grid] rounding = \"best\": choose one of nearest, gptq"),
    ({"seed": []}, {}, "[grid] seed = []: empty axis"),
    ({"seed": 0}, {}, "[grid] seed = 0: an axis is a list, e.g. seed = [0]"),
    ({"seed": [0, 0]}, {}, "[grid] seed = [0, 0]: 0 is listed twice"),
    ({"per_channel": ["yes"]}, {}, "[grid] per_channel = \"yes\": is a switch: give true or false"),
    ({"seed": [0]}, {"out": "x"}, "[build] out: not a grid key"),
    ({"seed": [0]}, {"seed": 1}, "[grid] seed: also set in [build]"),
    ({"seed": [0]}, {"limit": [1, 2]}, "[build] limit = [1, 2]: expected one string or number"),
    ({"target": ["onnx", "tpu"]}, {}, "bad --target tpu"),
])
def test_bad_grids_are_refused_naming_key_and_value(tmp_path, grid, build, needle):
    with pytest.raises(GridError) as err:
        _load(tmp_path, [RANDOM], grid, build)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg and msg.startswith("grid.toml")


@pytest.mark.parametrize(("text", "needle"), [
    ("[grid]\nseed = [0]\n", "no [[model]] table"),
    ("[[model]]\nweights = \"random\"\n", "[[model]] #1: no name"),
    ("[[model]]\nname = \"resnet99\"\nweights = \"random\"\n", "unknown model 'resnet99'"),
    ("[[model]]\nname = \"resnet20_cifar10_optA\"\n[grids]\nseed = [0]\n", "unknown table or key 'grids'"),
    ("[[model]]\nname = \"resnet20_cifar10_optA\"\nseed = 1\n[grid]\nseed = [0]\n", "seed: also a [grid] axis"),
    ("[[model]]\nname = \"resnet20_cifar10_optA\"\n[[model]]\nname = \"resnet20_cifar10_optA\"\n",
     "two cells have the same settings"),
    ("[[model]\nname = 1", "is not valid TOML"),
    ("[[model]]\nname = \"resnet20_cifar10_optA\"\ndata = \"imagefolder:/no/such/dir\"\n", "does not exist"),
])
def test_bad_grid_files(tmp_path, text, needle):
    p = tmp_path / "grid.toml"
    p.write_text(text)
    with pytest.raises(DfmpcError) as err:
        load_grid(p)
    assert needle in str(err.value), err.value


def test_a_missing_grid_file(tmp_path):
    with pytest.raises(DfmpcError, match="does not exist"):
        load_grid(tmp_path / "nope.toml")


def test_model_tables_override_shared_build_flags(tmp_path):
    g = _load(tmp_path, [dict(RANDOM, limit=5), RANDOM], {"seed": [0]}, {"limit": 9})
    assert [c.settings["limit"] for c in g.cells] == [5, 9]
    assert grid_text([RANDOM], {"seed": [0]}).count("[[model]]") == 1
