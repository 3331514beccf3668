"""Framework presets: what an app spec's `framework:` fills in.

A spec that says `framework: streamlit` and `script: app.py` gets the command
that serves `app.py` with Streamlit under the instance's prefix and port, the
readiness path that answers without side effects, and the page to open. What
the spec states itself wins over the preset; a preset only fills what is left
out. The filled spec is what is stored and what both backends run, so
`spinyard apps list` and the apps bucket show the real command.

Every preset serves the app under the prefix the gateway passes on unchanged
(`/apps/<owner>/<title>/<instance>/`). Shiny for Python and Gradio can only
be served from a proxy that strips the prefix, which the gateway does not do:
they have no preset (docs/frameworks.md).
"""

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

# Placeholders of the preset itself, filled when the spec is loaded (the backend's own,
# `{port}`, `{prefix}`, `{host}` and `{python}`, are left for the backend).
_SCRIPT, _STEM = "{script}", "{stem}"


@dataclass(frozen=True)
class Preset:
    command: tuple[str, ...]
    readiness_path: str = "/"
    entry_path: str = ""
    env: dict[str, str] = field(default_factory=dict)
    suffixes: tuple[str, ...] = (".py",)


PRESETS: dict[str, Preset] = {
    # `bokeh serve app.py` serves the app at /<prefix>/<stem>; its WebSocket is checked
    # against the page's origin, which is the gateway's (any, since the gateway may sit
    # behind any name), and the gateway's X-Forwarded-* headers name the public URL.
    "bokeh": Preset(
        command=(
            "{python}", "-m", "bokeh", "serve", _SCRIPT, "--port={port}",
            "--address={host}", "--prefix={prefix}", "--allow-websocket-origin=*",
            "--use-xheaders",
        ),
        readiness_path=f"/{_STEM}",
        entry_path=_STEM,
        suffixes=(".py", ".ipynb"),
    ),
    "panel": Preset(
        command=(
            "{python}", "-m", "panel", "serve", _SCRIPT, "--port={port}",
            "--address={host}", "--prefix={prefix}", "--allow-websocket-origin=*",
            "--use-xheaders",
        ),
        readiness_path=f"/{_STEM}",
        entry_path=_STEM,
        suffixes=(".py", ".ipynb"),
    ),
    # Dash reads its URL prefix from DASH_URL_BASE_PATHNAME when the app is created and
    # `app.run()` its port and address from PORT and HOST: the script must call
    # `app.run()` under `if __name__ == "__main__":` and set none of the three itself.
    "dash": Preset(
        command=("{python}", _SCRIPT),
        env={"DASH_URL_BASE_PATHNAME": "{prefix}", "PORT": "{port}", "HOST": "{host}"},
    ),
    # The toolbar's "Deploy" menu and the usage statistics have no place in an embed.
    "streamlit": Preset(
        command=(
            "{python}", "-m", "streamlit", "run", _SCRIPT, "--server.port={port}",
            "--server.address={host}", "--server.baseUrlPath={prefix}",
            "--server.headless=true", "--browser.gatherUsageStats=false",
            "--client.toolbarMode=viewer", "--global.developmentMode=false",
        ),
        readiness_path="/_stcore/health",
    ),
    # Each GET of the dashboard starts a kernel, so readiness asks for a static file
    # instead; kernels of viewers who left are culled after 10 idle minutes.
    "voila": Preset(
        command=(
            "{python}", "-m", "voila", _SCRIPT, "--port={port}", "--no-browser",
            "--Voila.ip={host}", "--Voila.base_url={prefix}",
            "--MappingKernelManager.cull_idle_timeout=600",
            "--MappingKernelManager.cull_interval=60",
        ),
        readiness_path="/voila/static/voila.js",
        suffixes=(".ipynb",),
    ),
}  # fmt: skip

FRAMEWORKS = tuple(PRESETS)


def expand(data: dict[str, Any]) -> dict[str, Any]:
    """Raw spec fields with what `data["framework"]` fills in, for fields left out.

    Raises:
        ValueError: no such framework, or `script` is missing or not a relative path to
            a file the framework serves.
    """
    name = data.get("framework")
    if name is None:
        return data
    if data.get("kind", "viz") != "viz":
        raise ValueError("framework is for viz apps (web servers); a job runs `command`")
    preset = PRESETS.get(name) if isinstance(name, str) else None
    if preset is None:
        raise ValueError(f"framework: {name!r} is not one of {', '.join(FRAMEWORKS)}")
    script = data.get("script")
    if not isinstance(script, str) or not script:
        raise ValueError(f"framework {name} needs `script`: the file it serves")
    path = PurePosixPath(script)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"script {script!r} must be a path inside the app's directory")
    if path.suffix not in preset.suffixes:
        raise ValueError(f"script {script!r}: {name} serves {' or '.join(preset.suffixes)} files")
    values = {_SCRIPT: script, _STEM: path.stem}

    def fill(text: str) -> str:
        for key, value in values.items():
            text = text.replace(key, value)
        return text

    filled = dict(data)
    filled.setdefault("command", [fill(part) for part in preset.command])
    filled.setdefault("readiness_path", fill(preset.readiness_path))
    filled.setdefault("entry_path", fill(preset.entry_path))
    env = data.get("env", {})
    if isinstance(env, dict):  # (anything else is the spec's own error, reported as such)
        filled["env"] = {**preset.env, **env}
    return filled
