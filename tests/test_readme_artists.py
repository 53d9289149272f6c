"""README's "For artists" section stays true: each command in it is accepted by the real command
line, the files it promises are what that command writes, and the add-on zip it names is the one
build_addon.py makes."""
from __future__ import annotations

import re
import shlex
import tomllib

import pytest

from backend_process import ROOT


def artists_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## For artists\n(.*?)^## ", text, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## For artists' section"
    return match.group(1)


def commands() -> list[list[str]]:
    found = re.findall(r"^\s*(\.venv/bin/\S+[^\n`]*)$", artists_section(), re.MULTILINE)
    found += re.findall(r"`(\.venv/bin/[^`]+)`", artists_section())
    return [shlex.split(line) for line in dict.fromkeys(found)]


def test_the_section_has_the_five_steps():
    steps = re.findall(r"^\d\. \*\*([^*]+)\*\*", artists_section(), re.MULTILINE)
    assert steps == ["Install the add-on", "Start the backend", "Get the head model", "Reconstruct in Blender",
                     "Export for other tools"]
    programs = [command[0].split("/")[-1] for command in commands()]
    assert sorted(set(programs)) == ["facerecon", "facerecon-backend", "python"]


@pytest.mark.parametrize("command", commands(), ids=lambda c: " ".join(c[:4]))
def test_each_command_is_accepted_by_the_real_command_line(command):
    program, *args = command
    if program.endswith("/python"):
        assert args == ["build_addon.py"] and (ROOT / "build_addon.py").is_file()
        return
    from backend_server.cli import backend, facerecon
    parser = (facerecon if program.endswith("/facerecon") else backend).build_parser()
    parsed = parser.parse_args(args)                            # exits (fails the test) on an unknown option
    if args[:2] == ["models", "install"]:
        from backend_server.models import store
        assert parsed.source is None and parsed.kind in store.DOWNLOADS     # one step: nothing to fetch first
    if args[:1] == ["reconstruct"]:
        from backend_server.cli.facerecon import outputs_of
        outputs = outputs_of(parsed.format)
        stem = parsed.inputs[0].rsplit(".", 1)[0]
        promised = set(re.findall(rf"`{parsed.output}/{stem}\.(\w+)`", artists_section()))
        assert promised == {"glb", "usdc", "png"}
        assert promised | {"obj"} <= set(outputs), f"README promises {promised}; --format writes {outputs}"


def test_the_zip_it_names_is_the_one_build_addon_makes():
    manifest = tomllib.loads((ROOT / "blender_addon" / "blender_manifest.toml").read_text())
    assert f"`dist/facerecon_blender-{manifest['version']}.zip`" in artists_section()
