"""Config discovery: `config show/list`, `train --dry-run`, shipped recipes by name, and docs tables that match the
code (every method_args key documented, no key documented that no longer exists)."""

import re
from pathlib import Path

import pytest
import yaml

from stepdistill.cli import main
from stepdistill.commands import config_tables
from stepdistill.config import describe, field_help, recipes_dir
from stepdistill.errors import ConfigError
from stepdistill.trainers import METHODS, get_method, load_config

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- BEGIN method_args -->\n(.*?)<!-- END method_args -->", re.S)


def _block(path: Path) -> str:
    m = BLOCK.search(path.read_text())
    assert m, f"{path} has no <!-- BEGIN method_args --> ... <!-- END method_args --> block"
    return m.group(1).strip()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_docs_page_lists_every_method_arg_and_no_other(method):
    page = ROOT / "docs" / "methods" / f"{method}.md"
    assert page.is_file(), f"no docs page for registered method '{method}'"
    block = _block(page)
    documented = re.findall(r"^\| `method_args\.(\w+)` \|", block, re.M)
    fields = [k.name for k in describe(get_method(method).Config)]
    assert documented == fields
    # The whole table, help texts and defaults included, is what the generator prints today.
    assert block == config_tables(method), f"regenerate with: stepdistill config show {method} --markdown"


def test_run_keys_page_matches_the_code():
    assert _block(ROOT / "docs" / "config.md") == config_tables("run"), \
        "regenerate with: stepdistill config show run --markdown"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_arg_has_help(method):
    missing = [k.name for k in describe(get_method(method).Config) if not k.help]
    assert not missing, f"{method}: fields without a comment above them: {missing}"


def test_field_help_reads_comment_blocks():
    from dataclasses import dataclass

    @dataclass
    class Example:
        # First line
        # continues here.
        a: int = 1
        b: int = 2
        # Own help.
        c: str = "x"

    assert field_help(Example) == {"a": "First line continues here.", "b": "First line continues here.",
                                   "c": "Own help."}


def test_config_show_prints_keys_with_type_default_and_help(capsys):
    assert main(["config", "show", "dmd2"]) == 0
    out = capsys.readouterr().out
    assert "method_args.real_guidance: float = 2.0" in out
    assert "CFG scale of the teacher" in out
    assert "phases: student, fake_score" in out
    assert main(["config", "show", "run"]) == 0
    assert "train.max_steps: int = 1000" in capsys.readouterr().out


def test_config_show_unknown_method_is_one_line_error(capsys):
    assert main(["config", "show", "dmd3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown method 'dmd3'" in err and "dmd2" in err


def test_config_list_names_methods_and_recipes(capsys):
    assert main(["config", "list"]) == 0
    out = capsys.readouterr().out
    assert "dmd2" in out and "digits16_lcm_lora" in out


def test_dry_run_prints_resolved_config_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "dmd2", "--config", "digits16_dmd2", "--out", str(out), "--dry-run",
                 "train.max_steps=7", "optim.student.lr=3e-5"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    cfg = yaml.safe_load(text)
    assert cfg["train"]["max_steps"] == 7  # override
    assert cfg["optim"]["student"]["lr"] == 3e-5
    file_cfg = yaml.safe_load((recipes_dir() / "digits16_dmd2.yaml").read_text())
    assert cfg["method_args"]["min_t"] == file_cfg["method_args"]["min_t"]  # from the file
    assert "regression_steps" not in file_cfg["method_args"]
    assert cfg["method_args"]["regression_steps"] == 20  # a default filled in
    assert cfg["optim"]["fake_score"]["beta2"] == 0.999  # optimizer defaults of every phase
    assert "would start a new run" in text


def test_dry_run_refuses_bad_override_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "dmd2", "--config", "digits16_dmd2", "--out", str(out), "--dry-run",
                 "method_args.nope=1"]) == 2
    assert "unknown config key 'method_args.nope'" in capsys.readouterr().err
    assert not out.exists()


def test_shipped_recipe_by_name_and_by_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: configs/ is not in the working directory
    by_name = load_config("digits16_lcm", method="consistency")
    by_path = load_config("configs/digits16_lcm.yaml", method="consistency")
    assert by_name == by_path and by_name.method_args.sample_timesteps == [[999, 699, 399, 19], [999, 199]]
    with pytest.raises(ConfigError, match="no shipped recipe has that name"):
        load_config("digits16_nothing")


def test_optim_section_for_unknown_phase_refused_at_load():
    with pytest.raises(ConfigError, match="'optim.critic' is not a phase of method 'dmd2'"):
        load_config("digits16_dmd2", ["optim.critic.lr=1e-4"])


def _readme_commands() -> list[list[str]]:
    """Every `stepdistill ...` command in the README's bash blocks, as argv after the program name."""
    import shlex

    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if "stepdistill" not in line or "..." in line:
                continue
            argv = shlex.split(line.split("&&")[-1])
            start = next(i for i, a in enumerate(argv) if a.endswith("stepdistill"))
            commands.append(argv[start + 1:])
    return commands


def test_readme_commands_parse_and_name_real_recipes(tmp_path, capsys):
    """Every README command is accepted by the CLI as written; training commands that name a shipped recipe
    resolve it (a --dry-run, which writes nothing)."""
    from stepdistill.cli import build_parser

    commands = _readme_commands()
    assert len(commands) >= 8
    for argv in commands:
        args, extra = build_parser().parse_known_args(argv)
        assert all("=" in x and not x.startswith("-") for x in extra), argv
        if args.command == "train" and args.config and not args.config.startswith("my_"):
            out = tmp_path / "never"
            assert main([*argv[:argv.index("--out")], "--out", str(out), "--dry-run"]) == 0, argv
            assert not out.exists()
    capsys.readouterr()


def test_unset_mixed_precision_is_what_accelerate_was_launched_with(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert load_config("digits16_lcm").train.mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` exports
    assert load_config("digits16_lcm").train.mixed_precision == "bf16"
    assert load_config("digits16_lcm", ["train.mixed_precision=no"]).train.mixed_precision == "no"  # explicit wins


def test_every_shipped_recipe_loads():
    from stepdistill.config import list_recipes

    names = list_recipes()
    assert {"digits16_dmd2", "sd3_dmd2", "flux_dmd2", "sdxl_lcm_lora"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.method in METHODS and cfg.optim, name
