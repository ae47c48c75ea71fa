"""Installs like a package: the shipped configs are found from any folder, install hints follow how
toroidal was installed, and a missing optional package is one line naming its extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from toroidal.longcontext.tasks import template_folder
from toroidal.runtime import install
from toroidal.training.models import resolve_model
from toroidal_cli.resolve import config_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def installed(monkeypatch):
    """toroidal as if installed in site-packages (not run from this checkout)."""
    monkeypatch.setattr(install, "_in_source_checkout", lambda: False)
    install.editable_install.cache_clear()
    yield
    install.editable_install.cache_clear()


class FakeDistribution:
    def __init__(self, direct_url: dict | None):
        self.direct_url = direct_url

    def read_text(self, name: str) -> str | None:
        assert name == "direct_url.json"
        return None if self.direct_url is None else json.dumps(self.direct_url)


@pytest.mark.parametrize(
    ("direct_url", "expected"),
    [
        ({"url": "file:///src/toroidal", "dir_info": {"editable": True}}, 'pip install -e ".[eval]"'),
        ({"url": "file:///src/toroidal", "dir_info": {}}, 'pip install "toroidal-attention[eval]"'),
        ({"url": "file:///w/t.whl", "archive_info": {}}, 'pip install "toroidal-attention[eval]"'),
        (None, 'pip install "toroidal-attention[eval]"'),  # from an index: no direct_url.json
    ],
)
def test_install_hints_follow_how_toroidal_was_installed(direct_url, expected, monkeypatch, installed):
    import importlib.metadata

    def distribution(name):
        assert name == "toroidal-attention"
        return FakeDistribution(direct_url)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    assert install.install_command("eval") == expected
    message = install.missing_module_message("transformers.models")  # a module inside the package
    assert message == f"needs transformers, from the eval extra: {expected}"
    assert install.missing_module_message("numpy") is None


def test_not_installed_outside_a_checkout_is_told_the_wheel_install(monkeypatch, installed):
    import importlib.metadata

    def distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    assert install.install_command("plot") == 'pip install "toroidal-attention[plot]"'


def test_a_source_checkout_is_told_the_editable_install():
    assert install.editable_install()  # these tests run from the checkout, installed editable or not
    assert install.install_command("plot") == 'pip install -e ".[plot]"'


def test_presets_and_task_templates_are_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert install.configs_folder() == ROOT / "configs"  # a checkout: the top-level folder
    assert config_path("quick", "bench") == ROOT / "configs" / "bench" / "quick.yaml"
    assert config_path("periodic", "train") == ROOT / "configs" / "train" / "periodic.yaml"
    assert resolve_model("micro").kind == "preset"
    assert template_folder() == ROOT / "configs" / "tasks" / "toroidal"
    # ./configs/KIND of the working directory wins over the shipped presets
    (tmp_path / "configs" / "bench").mkdir(parents=True)
    (tmp_path / "configs" / "bench" / "quick.yaml").write_text("seq_len: [64]\n", encoding="utf-8")
    assert config_path("quick", "bench") == Path("configs") / "bench" / "quick.yaml"


def test_an_installed_package_reads_its_own_configs(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "toroidal"  # a wheel's layout: toroidal/configs
    (package / "configs" / "bench").mkdir(parents=True)
    monkeypatch.setattr(install, "_PACKAGE", package)
    assert install.configs_folder() == package / "configs"
    assert install.config_folders("bench") == (Path("configs") / "bench", package / "configs" / "bench")


def test_the_wheel_ships_every_package_and_the_configs():
    """pyproject lists the packages (setuptools' find cannot map configs/ to toroidal.configs): the list
    must hold every package of the source tree, and every folder of configs/ as toroidal.configs.*."""
    from setuptools import find_packages

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    code = set(find_packages(str(ROOT), include=["toroidal", "toroidal.*", "toroidal_cli", "toroidal_cli.*"]))
    configs = {
        ".".join(("toroidal", *folder.relative_to(ROOT).parts))
        for folder in [ROOT / "configs", *(ROOT / "configs").rglob("*")]
        if folder.is_dir() and folder.name != "__pycache__"
    }
    assert set(tool["packages"]) == code | configs
    assert tool["package-dir"]["toroidal.configs"] == "configs"
    globs = tool["package-data"]
    for path in (ROOT / "configs").rglob("*"):
        if path.is_file():
            package = ".".join(("toroidal", *path.parent.relative_to(ROOT).parts))
            assert any(path.match(glob) for glob in globs.get(package, [])), f"{path} is not shipped"


# --- a missing optional package ---------------------------------------------------------------------------

# Runs `toroidal ARGS` for each case in one interpreter where the optional packages cannot be imported.
HIDE_EXTRAS = textwrap.dedent(
    """
    import contextlib, io, json, sys, traceback

    HIDDEN = {"transformers", "lm_eval", "datasets", "matplotlib", "geoopt"}

    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    from toroidal_cli.app import main

    results = []
    for args in json.loads(sys.argv[1]):
        sys.argv = ["toroidal", *args]
        out, err, code = io.StringIO(), io.StringIO(), None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exit:
                code = exit.code
            except BaseException:
                traceback.print_exc()
                code = "traceback"
        results.append({"args": args, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
    print(json.dumps(results))
    """
)

SMALL = ["--seq-len", "16", "--batch-size", "2"]
PASSKEY = ["--tasks", "passkey", "--lengths", "128"]
NEEDS = {  # command -> (arguments, the package and extra its one line names)
    "train": (["train", "--steps", "1", *SMALL], "needs transformers", "eval"),
    "eval": (["eval", "--model", "micro", *SMALL, "--dataset", "periodic"], "needs transformers", "eval"),
    "longbench": (["longbench", "--model", "micro", *PASSKEY], "needs", "eval"),
    "scrolls": (["scrolls", "--model", "micro"], "needs", "eval"),
    "plot": (["plot", "attention", "--seq-len", "8", "--out", "a.png"], "needs matplotlib", "plot"),
    "bench --plot": (["bench", "-n", "64", "-b", "sdpa", "--plot", "b.png"], "needs matplotlib", "plot"),
    "validate -m hyperbolic": (["validate", "--quick", "-m", "hyperbolic"], "needs geoopt", "hyperbolic"),
}


@pytest.fixture(scope="module")
def without_extras(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("no-extras")
    cases = [args for args, *_ in NEEDS.values()] + [["--help"], ["bench", "--help"]]
    done = subprocess.run(
        [sys.executable, "-c", HIDE_EXTRAS, json.dumps(cases)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    return {" ".join(r["args"]): r for r in results}


@pytest.mark.parametrize("command", list(NEEDS))
def test_a_missing_optional_package_is_one_line_naming_the_extra(command, without_extras):
    args, needs, extra = NEEDS[command]
    result = without_extras[" ".join(args)]
    assert result["code"] == 1, result
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result["stdout"], result
    name = command.split()[0]
    assert lines[0].startswith(f"toroidal {name}"), lines[0]
    assert needs in lines[0] and f"from the {extra} extra: pip install" in lines[0], lines[0]
    assert f'".[{extra}]"' in lines[0] or f'"toroidal-attention[{extra}]"' in lines[0], lines[0]


def test_help_works_without_the_optional_packages(without_extras):
    assert without_extras["--help"]["code"] == 0
    assert without_extras["bench --help"]["code"] == 0
