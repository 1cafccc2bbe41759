"""The README, as a newcomer reads it (issue 35): every ```python block uses only names it or an earlier block
defines, the blocks run in order as pasted (slow: on the packaged MiniLM and SmolLM2, a 2-step Trainer run),
and every `replora ...` command line parses with the real parser."""
from __future__ import annotations

import ast
import builtins
import re
import shlex
from pathlib import Path

import pytest

from replora.training import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _names_used_and_bound(tree: ast.AST) -> tuple[list[str], set[str]]:
    used, bound = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                used.append(node.id)
            else:
                bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.comprehension):
            bound.update(n.id for n in ast.walk(node.target) if isinstance(n, ast.Name))
    return used, bound


def test_every_python_block_uses_only_names_defined_before_it():
    defined = set(dir(builtins))
    for number, block in enumerate(blocks("python"), 1):
        used, bound = _names_used_and_bound(ast.parse(block))
        undefined = sorted({name for name in used if name not in defined | bound})
        assert not undefined, f"README python block {number} uses {undefined} that no block defines:\n{block}"
        defined |= bound


@pytest.mark.slow
@pytest.mark.integration
def test_python_blocks_run_as_pasted(tmp_path, monkeypatch):
    """One namespace for all blocks, in order, in an empty folder: as a reader pasting them into one session."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for number, block in enumerate(blocks("python"), 1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README python block {number} failed: {type(e).__name__}: {e}\n{block}") from e
    assert (tmp_path / "merged-model" / "tokenizer_config.json").is_file()
    assert (tmp_path / "final" / "adapter_config.json").is_file()


def cli_lines() -> list[tuple[str, list[str]]]:
    """(the README line, the arguments after `replora`) of every command in a ```bash block that runs replora:
    `replora ...`, `.venv/bin/replora ...`, and `... -m replora ...` under torchrun / accelerate."""
    found = []
    for block in blocks("bash"):
        for line in block.splitlines():
            command_line = line.split(" #", 1)[0].strip()
            for command in command_line.split("&&"):
                words = shlex.split(command)
                if words and words[-1] == "...":
                    words = words[:-1]  # "...": further flags of the reader's choosing
                for i, word in enumerate(words):
                    if word in ("replora", ".venv/bin/replora") and (i == 0 or words[i - 1] == "-m"):
                        found.append((line, words[i + 1:]))
                        break
    # commands quoted in the prose with their arguments (`replora export-gguf --adapter runs/x --output lora.gguf`)
    for span in re.findall(r"`replora ([a-z-]+ [^`]+)`", README.read_text()):
        found.append((f"replora {span}", shlex.split(span)))
    return found


def test_the_readme_shows_replora_command_lines():
    commands = {args[0] for _, args in cli_lines() if args}
    assert {"train", "eval", "summary", "demo", "export-gguf"} <= commands, commands


@pytest.mark.parametrize("line,args", cli_lines(), ids=[line.split(" #")[0].strip()[:60] for line, _ in cli_lines()])
def test_every_readme_command_line_parses(line, args, capsys):
    parser = cli.build_parser()
    try:
        parsed = parser.parse_args(args)
    except SystemExit as e:  # --help prints and exits 0; a bad flag exits 2
        assert e.code == 0 and "--help" in args, f"README line does not parse: {line}\n{capsys.readouterr().err}"
        return
    assert callable(parsed.func)
    if parsed.command == "train":  # every flag given is a setting with a valid value (nothing is trained)
        from replora.training.settings import adapter_flags, settings_from, train_flags

        known = train_flags() | adapter_flags()
        settings_from({k: v for k, v in vars(parsed).items() if k in known})
