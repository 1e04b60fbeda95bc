"""Flags from a dataclass: each field of train.Config declares its flag once, with its help, choices and --help
section (`option`); `parser_for` turns the dataclass into an argparse parser. Plumbing a first reading skips."""
from __future__ import annotations

import argparse
from dataclasses import field, fields


def option(default, help: str, choices=None, section: str | None = None):
    """A Config field carrying its command-line help (and choices): each flag is declared in one place. `section`, on
    the first flag of a group, titles the group of flags from there on in --help."""
    return field(default=default, metadata={"help": help, "choices": choices, "section": section})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append "(default: X)" to a flag's help unless the help already says its default."""

    def _get_help_string(self, action):
        return action.help if "default" in action.help else super()._get_help_string(action)


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("all", "none") else int(text)


def parser_for(config_class, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of `config_class`, in its sections: bools as --x / --no-x, list
    fields (`levels`) as several values, `int | None` fields taking 'all' or 'none' for None."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    group = parser
    for f in fields(config_class):  # in sections, as the class lists them
        flag, help_, choices = f"--{f.name}", f.metadata["help"], f.metadata["choices"]
        group = parser.add_argument_group(f.metadata["section"]) if f.metadata["section"] else group
        if f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        elif f.type.startswith("list"):
            group.add_argument(flag, nargs="+", default=None, help=help_)
        else:
            kind = {"int": int, "float": float, "str": str, "int | None": _optional_int, "str | None": str}[f.type]
            group.add_argument(flag, type=kind, default=f.default, choices=choices, help=help_)
    return parser
