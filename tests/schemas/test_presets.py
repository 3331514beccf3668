"""Framework presets: what `framework:` fills in, what the spec's own fields override,
and what bad presets get (each preset's example runs in Chromium: tests/browser); and
how a job app says what its outputs are (`output_types`, `charts`)."""

import pytest
from pydantic import ValidationError

from schemas.presets import FRAMEWORKS
from schemas.spec import AppSpec, load_spec
from tests.helpers import ROOT


def spec(**fields) -> AppSpec:
    return AppSpec(name="docs/app", **fields)


def test_streamlit_is_served_under_the_prefix_with_its_health_path():
    s = spec(framework="streamlit", script="app.py")
    assert s.command[:5] == ["{python}", "-m", "streamlit", "run", "app.py"]
    assert "--server.baseUrlPath={prefix}" in s.command and "--server.port={port}" in s.command
    assert "--client.toolbarMode=viewer" in s.command  # no "Deploy" menu in an embed
    assert s.readiness_path == "/_stcore/health" and s.entry_path == ""


def test_bokeh_and_panel_serve_the_script_at_its_stem():
    for name in ("bokeh", "panel"):
        s = spec(framework=name, script="apps/sliders.py")
        assert s.command[1:5] == ["-m", name, "serve", "apps/sliders.py"]
        assert "--prefix={prefix}" in s.command
        assert (s.readiness_path, s.entry_path) == ("/sliders", "sliders")


def test_dash_gets_its_prefix_port_and_host_from_the_environment():
    s = spec(framework="dash", script="app.py", env={"MY_SETTING": "1"})
    assert s.command == ["{python}", "app.py"]
    assert s.env == {
        "DASH_URL_BASE_PATHNAME": "{prefix}",
        "PORT": "{port}",
        "HOST": "{host}",
        "MY_SETTING": "1",
    }


def test_voila_probes_a_static_file_and_culls_idle_kernels():
    s = spec(framework="voila", script="dashboard.ipynb")
    assert s.readiness_path == "/voila/static/voila.js"  # a GET of the page starts a kernel
    assert "--Voila.base_url={prefix}" in s.command
    assert any(part.startswith("--MappingKernelManager.cull_idle_timeout=") for part in s.command)


def test_what_the_spec_says_itself_wins():
    s = spec(
        framework="streamlit",
        script="app.py",
        command=["{python}", "-m", "streamlit", "run", "app.py", "--server.port={port}"],
        readiness_path="/healthz",
        env={"PORT": "9"},
    )
    assert s.command[-1] == "--server.port={port}" and s.readiness_path == "/healthz"
    s = spec(framework="dash", script="app.py", env={"PORT": "9"})
    assert s.env["PORT"] == "9"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"framework": "shiny", "script": "app.py"}, "is not one of"),
        ({"framework": "gradio", "script": "app.py"}, "is not one of"),
        ({"framework": "streamlit"}, "needs `script`"),
        ({"framework": "streamlit", "script": ""}, "needs `script`"),
        ({"framework": "streamlit", "script": "/srv/app.py"}, "inside the app's directory"),
        ({"framework": "streamlit", "script": "../app.py"}, "inside the app's directory"),
        ({"framework": "voila", "script": "app.py"}, "serves .ipynb files"),
        ({"framework": "dash", "script": "app.ipynb"}, "serves .py files"),
        ({"framework": "dash", "script": "app.py", "kind": "job"}, "for viz apps"),
        ({"framework": ["dash"], "script": "app.py"}, "is not one of"),
    ],
)
def test_a_bad_preset_is_refused_saying_why(fields, message):
    with pytest.raises(ValidationError, match=message):
        spec(**fields)


def test_a_spec_with_neither_framework_nor_command_is_refused():
    with pytest.raises(ValidationError, match="command"):
        spec()


def test_every_preset_has_an_example_that_uses_it():
    found = {load_spec(p).framework for p in (ROOT / "examples").rglob("spinyard.yaml")}
    assert set(FRAMEWORKS) <= found


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"output_types": {"other.png": "image/png"}}, "not one of the app's outputs"),
        ({"output_types": {"plot.dat": "an image"}}, "is not a media type"),
        ({"charts": {"plot.dat": {"x": "a", "y": ["b"]}}}, "is not a CSV output"),
        ({"charts": {"table.csv": {"x": "a", "y": []}}}, "at least 1 item"),
        ({"charts": {"missing.csv": {"x": "a", "y": ["b"]}}}, "not one of the app's outputs"),
    ],
)
def test_output_types_and_charts_name_declared_outputs(fields, message):
    base = {"kind": "job", "command": ["run"], "outputs": ["table.csv", "plot.dat"]}
    with pytest.raises(ValidationError, match=message):
        spec(**base, **fields)
    ok = spec(
        **base, output_types={"plot.dat": "image/png"}, charts={"table.csv": {"x": "a", "y": ["b"]}}
    )
    assert ok.media_type("plot.dat") == "image/png" and ok.media_type("table.csv") == "text/csv"
