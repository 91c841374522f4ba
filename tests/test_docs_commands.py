"""Every `fulltune` command the README and the docs show is one the CLI accepts, and the ones that can
run here do: the docs cannot drift from the code again."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fulltune.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "pipelines" / "README.md", ROOT / "charts" / "fulltune" / "README.md"]
DOCS += sorted((ROOT / "docs").glob("*.md"))


def shown_commands() -> list[tuple[str, str]]:
    """(where, command) of each `fulltune ...` line in a fenced or indented code block, with its
    continuation lines joined and its trailing comment dropped."""
    found = []
    for doc in DOCS:
        fenced, pending, start = False, "", 0
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            in_code = fenced or line.startswith("    ")
            text = line.strip()
            if pending:
                pending += " " + text.rstrip("\\").strip()
                if not text.endswith("\\"):
                    found.append((f"{doc.relative_to(ROOT)}:{start}", pending))
                    pending = ""
                continue
            if in_code and text.startswith("fulltune "):
                command = re.sub(r"\s+#.*$", "", text)
                if command.endswith("\\"):
                    pending, start = command.rstrip("\\").strip(), number
                else:
                    found.append((f"{doc.relative_to(ROOT)}:{number}", command))
    return found


COMMANDS = shown_commands()


def _parser_for(words: list[str]):
    """The argparse parser of the sub-command `words` names (e.g. ["registry", "list"])."""
    parser = build_parser()
    for word in words:
        subparsers = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subparsers or word not in subparsers[0].choices:
            return parser, word
        parser = subparsers[0].choices[word]
    return parser, None


def test_the_docs_show_commands_at_all():
    assert len(COMMANDS) >= 12
    assert {c.split()[1] for _, c in COMMANDS} >= {
        "compile",
        "config",
        "demo",
        "submit",
        "schedule",
        "registry",
    }


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_shown_command_and_option_exists(where, command):
    words = [w for w in re.split(r"[\s\[\]]+", command) if w][1:]
    positional = [w for w in words if not w.startswith("-")]
    parser, unknown = _parser_for(positional[:2] if positional[:1] == ["registry"] else positional[:1])
    assert unknown is None, f"{where}: `fulltune {unknown}` is not a command"
    for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", command):
        assert option in parser._option_string_actions, f"{where}: {option} is not an option of: {command}"


RUNNABLE = [(w, c) for w, c in COMMANDS if re.fullmatch(r"fulltune config --check \S+( --for-cluster)?", c)]


@pytest.mark.parametrize(("where", "command"), RUNNABLE, ids=[w for w, _ in RUNNABLE])
def test_shown_config_checks_pass_on_the_files_they_name(where, command):
    args = shlex.split(command)[1:]
    if not (ROOT / args[2]).exists():
        pytest.skip(f"{where}: {args[2]} is the reader's own file")
    args[2] = str(ROOT / args[2])
    assert main(args) == 0, where


def test_every_sub_command_has_help(capsys):
    for words in (["compile"], ["config"], ["demo"], ["submit"], ["schedule"], ["registry"]):
        with pytest.raises(SystemExit) as done:
            main([*words, "--help"])
        assert done.value.code == 0
        assert "usage: fulltune" in capsys.readouterr().out


def test_compile_as_the_readme_shows_it_writes_the_pipeline(tmp_path):
    assert main(["compile", "--root", str(tmp_path), "--eval-gpus", "1"]) == 0
    assert (tmp_path / "pipelines" / "full_finetune.yaml").exists()


def test_the_version_matrix_states_the_kfp_backend_the_compiled_yaml_needs():
    """The compiled pipeline marks its Secrets optional, which KFP drivers before 2.15 reject: the
    matrix in docs/deploy.md must say 2.15 as long as the YAML does that."""
    import yaml

    from fulltune.kfp.compile import PIPELINE_FILE

    platform = list(yaml.safe_load_all((ROOT / PIPELINE_FILE).read_text()))[1]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
    uses_optional = any("optional" in s for e in executors for s in e.get("secretAsEnv", []))
    matrix = (ROOT / "docs" / "deploy.md").read_text()
    row = next(line for line in matrix.splitlines() if line.startswith("| Kubeflow Pipelines backend |"))
    assert uses_optional and "2.15 or later" in row
