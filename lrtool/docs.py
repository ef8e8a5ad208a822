"""Man pages and shell completions, generated from the typer app so that they never drift from it.

    python -m lrtool.docs [OUTDIR]     # what `make docs` runs; OUTDIR defaults to the current directory

writes OUTDIR/man/lrtool.1, OUTDIR/man/lrtool-<verb>.1 (one page a top-level verb; a group's page documents
every subcommand) and OUTDIR/completions/lrtool.{bash,zsh,fish} (static: no Python starts on TAB).
tests/test_docs.py regenerates them into a temporary folder and fails on any difference.

Why a walk of our own: typer >= 0.26 carries its own click (typer._click), whose parameters describe their
type in `type_descriptor` instead of click's ParamType, so click-man finds no options at all. `describe()`
turns `typer.main.get_command(app)` into plain `Command`/`Param` records (groups list `.commands` in
registration order, commands their `.params` in declaration order); the renderers below read only those.
The output is byte-identical on every run: no dates, and no version but lrtool's.
"""

import inspect
import re
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import get_args

import typer

from lrtool import __version__
from lrtool.errors import EXIT_GATE, EXIT_INTERRUPTED, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE

PROG = "lrtool"

EXIT_STATUS = (
    (EXIT_OK, "Success."),
    (
        EXIT_RUNTIME,
        "Runtime error: a bad input file, incompatible adapters, an output that exists without --force, ...",
    ),
    (EXIT_USAGE, "Usage error: an unknown, missing or conflicting option, a value out of range."),
    (EXIT_GATE, "A quality gate failed (eval --fail-under, diagnose --fail-on)."),
    (EXIT_INTERRUPTED, "Interrupted (Ctrl-C or SIGTERM); no partial output is left behind."),
)

ENVIRONMENT = (
    ("LRTOOL_DEBUG", "Set to 1 to print the traceback of an error (as --debug does)."),
    ("NO_COLOR", "Set to anything non-empty to turn colour off in tables and messages."),
)

# How a value is completed: from the choices, as a file or directory name, or not at all (numbers, flags).
CHOICES, FILES, DIRS, NOTHING = "choices", "files", "dirs", "nothing"


# ---------------------------------------------------------------------------------------------- the walk


@dataclass(frozen=True)
class Param:
    """An option or argument as the docs show it."""

    opts: tuple[str, ...]  # every spelling, short ones first ('-o', '--out'); () for an argument
    metavar: str  # what the value is called (SPLIT, INT, PATH); '' for a flag
    help: str
    completion: str  # CHOICES, FILES, DIRS or NOTHING
    choices: tuple[str, ...] = ()
    default: str | None = None  # as help shows it; None when not shown
    range: str | None = None  # "0 or more", ...
    required: bool = False
    repeatable: bool = False  # an option given more than once, or an argument taking several values
    envvars: tuple[str, ...] = ()

    @property
    def is_argument(self) -> bool:
        return not self.opts

    @property
    def takes_value(self) -> bool:
        return bool(self.opts and self.metavar)


@dataclass(frozen=True)
class Command:
    """A command or group: `path` is its words after `lrtool` (() for lrtool itself)."""

    path: tuple[str, ...]
    summary: str  # one sentence
    help: str  # the whole docstring
    epilog: str
    params: tuple[Param, ...]  # declaration order, -h/--help last
    subcommands: tuple["Command", ...]  # registration order
    is_group: bool

    @property
    def name(self) -> str:
        return " ".join((PROG, *self.path))

    @property
    def arguments(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.is_argument)

    @property
    def options(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.is_argument)

    def walk(self) -> Iterator["Command"]:
        """This command and every command below it, depth first, in registration order."""
        yield self
        for sub in self.subcommands:
            yield from sub.walk()


def describe(app: typer.Typer | None = None) -> Command:
    """The command tree of `app` (lrtool's own by default), without hidden commands and parameters."""
    if app is None:
        from lrtool.cli import app
    return _command(typer.main.get_command(app), (), None)


def _command(cmd, path: tuple[str, ...], parent_ctx) -> Command:
    # A context without parsing anything: it carries help_option_names, so get_params() adds -h/--help.
    info_name = path[-1] if path else PROG
    ctx = cmd.context_class(cmd, parent=parent_ctx, info_name=info_name, **cmd.context_settings)
    subcommands = getattr(cmd, "commands", None)
    help = inspect.cleandoc(cmd.help or "").partition("\f")[0]
    return Command(
        path=path,
        summary=inspect.cleandoc(cmd.short_help) if cmd.short_help else _summary(help),
        help=help,
        epilog=inspect.cleandoc(cmd.epilog or ""),
        params=tuple(_param(p) for p in cmd.get_params(ctx) if not getattr(p, "hidden", False)),
        subcommands=tuple(
            _command(sub, (*path, name), ctx) for name, sub in (subcommands or {}).items() if not sub.hidden
        ),
        is_group=subcommands is not None,
    )


_TYPE_NAMES = {"int": "INT", "float": "FLOAT", "str": "TEXT", "bool": "BOOL"}


def _param(param) -> Param:
    desc = param.type_descriptor  # typer's stand-in for click's ParamType
    is_argument = param.param_type_name == "argument"
    is_flag = not is_argument and (param.is_flag or param.count)
    choices = tuple(_choice(c) for c in desc.choices or ())
    annotation = get_args(desc.annotation)[0] if desc.is_list else desc.annotation

    if is_flag:
        metavar, completion = "", NOTHING
    elif choices:
        metavar, completion = param.metavar or param.name.upper(), CHOICES
    elif desc.is_file or desc.is_path:
        kind = "file" if desc.is_file else desc.path_type
        metavar, completion = param.metavar or kind.upper(), DIRS if kind == "dir" else FILES
    elif desc.is_tuple:
        metavar = param.metavar or " ".join(_type_name(a) for a in get_args(annotation))
        completion = FILES
    else:
        metavar = param.metavar or (param.name.upper() if is_argument else _type_name(annotation))
        completion = NOTHING if annotation in (int, float, bool) else FILES

    opts = () if is_argument else tuple(sorted([*param.opts, *param.secondary_opts], key=_is_long))
    envvar = param.envvar
    return Param(
        opts=opts,
        metavar=metavar,
        help=inspect.cleandoc(param.help or ""),
        completion=completion,
        choices=choices,
        default=_default(param, is_flag),
        range=_range(getattr(param, "min", None), getattr(param, "max", None), is_flag and param.count),
        required=bool(param.required),
        repeatable=bool(param.multiple) or param.nargs == -1,
        envvars=(envvar,) if isinstance(envvar, str) else tuple(envvar or ()),
    )


def _is_long(opt: str) -> bool:
    return len(opt) > 2


def _choice(value) -> str:
    return str(value.value) if isinstance(value, Enum) else str(value)


def _type_name(annotation) -> str:
    name = getattr(annotation, "__name__", "value")
    return _TYPE_NAMES.get(name, name.upper())


def _default(param, is_flag: bool) -> str | None:
    """The default as typer's help shows it (Enum members by value), or None when help shows none."""
    if isinstance(param.show_default, str):
        return param.show_default
    value = param.default
    if not param.show_default or value is None or callable(value):
        return None
    if is_flag:
        if not param.secondary_opts:
            return None  # a plain flag is off unless given
        return (param.opts if value else param.secondary_opts)[0]
    values = value if isinstance(value, (list, tuple)) else (value,)
    shown = ", ".join(_choice(v) for v in values)
    return shown or None


def _range(low, high, count: bool) -> str | None:
    if count and low == 0 and high is None:
        return None  # a counter starts at 0: nothing to say
    if low is not None and high is not None:
        return f"{low} to {high}"
    if low is not None:
        return f"{low} or more"
    if high is not None:
        return f"{high} or less"
    return None


# ---------------------------------------------------------------------------------------------- text


def _paragraphs(text: str) -> list[list[str]]:
    """Blank-line separated paragraphs, each a list of its lines."""
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def _summary(text: str) -> str:
    """The first sentence of the first paragraph, on one line. Unlike click's short help it goes on past
    "e.g." and "i.e.": a sentence ends at a full stop before a capital letter or at the paragraph's end."""
    paragraphs = _paragraphs(text)
    words = " ".join(paragraphs[0]).split() if paragraphs else []
    for i, word in enumerate(words[:-1]):
        if word.endswith(".") and words[i + 1][0].isupper():
            return " ".join(words[: i + 1])
    return " ".join(words)


def _examples(epilog: str) -> tuple[str, list[list[str]]]:
    """(prose before an "Examples:" line, the example blocks after it, each a list of lines)."""
    lines = epilog.splitlines()
    for i, line in enumerate(lines):
        if line.strip().lower() in ("examples:", "example:"):
            prose = "\n".join(lines[:i])
            return prose, _paragraphs(textwrap.dedent("\n".join(lines[i + 1 :])))
    return epilog, []


# ---------------------------------------------------------------------------------------------- man pages

_ROFF_CHARS = {"\\": r"\e", "-": r"\-", "'": r"\(aq", "`": r"\(ga", '"': r"\(dq", "~": r"\(ti", "^": r"\(ha"}


def _esc(text: str) -> str:
    """Plain text made safe for roff: escapes, hyphens as minus signs (copyable options), no raw non-ASCII."""
    out = "".join(
        _ROFF_CHARS.get(ch) or (ch if " " <= ch <= "~" else " " if ch == "\t" else f"\\[u{ord(ch):04X}]")
        for ch in text
    )
    return "\\&" + out if out.startswith(".") else out


def _b(text: str) -> str:
    return rf"\fB{_esc(text)}\fR"


def _i(text: str) -> str:
    return rf"\fI{_esc(text)}\fR"


def _man_text(text: str, first: str | None = ".PP", then: str = ".PP") -> list[str]:
    """Markdown-ish help as roff paragraphs: blank lines part paragraphs, indented blocks stay verbatim,
    list items start a new line. `first` opens the first paragraph (None: it follows a .TP tag)."""
    lines: list[str] = []
    for n, block in enumerate(_paragraphs(text)):
        macro = first if n == 0 else then
        if macro:
            lines.append(macro)
        if all(line.startswith("    ") for line in block):  # a Markdown code block: keep lines and spaces
            code = textwrap.dedent("\n".join(block)).splitlines()
            lines += [".RS 4", ".nf", *(_esc(line) for line in code), ".fi", ".RE"]
            continue
        for k, line in enumerate(block):
            if k and re.match(r"\s*([-*+]|\d+[.)])\s", line):
                lines.append(".br")
            lines.append(_esc(line.strip()))
    return lines


def _man_verbatim(blocks: list[list[str]]) -> list[str]:
    lines: list[str] = []
    for block in blocks:
        lines += [".PP", ".RS 4", ".nf", *(_esc(line) for line in block), ".fi", ".RE"]
    return lines


def _man_synopsis(cmd: Command) -> str:
    words = [_b(cmd.name), r"[\fIOPTIONS\fR]"]
    for p in cmd.params:
        if p.required and not p.is_argument:
            words.append(_b(p.opts[-1]) + (" " + _i(p.metavar) if p.metavar else ""))
    for p in cmd.arguments:
        words.append(_man_argument(p) if p.required else f"[{_man_argument(p)}]")
    if cmd.is_group:
        words.append(r"\fICOMMAND\fR [\fIARGS\fR]...")
    return " ".join(words)


def _man_argument(p: Param) -> str:
    """DATA, or DATA... for an argument that takes several (unless its metavar says so already)."""
    dots = "..." if p.repeatable and not p.metavar.endswith("...") else ""
    return _i(p.metavar) + dots


def _man_param(p: Param) -> list[str]:
    if p.is_argument:
        tag = _man_argument(p)
    else:
        tag = ", ".join(_b(o) for o in p.opts) + (" " + _i(p.metavar) if p.metavar else "")
    notes = []
    if p.choices:
        notes.append(_i(p.metavar) + " is one of: " + ", ".join(_b(c) for c in p.choices) + ".")
    if p.default is not None:
        notes.append("Default: " + _b(p.default) + ".")
    if p.range:
        notes.append("Range: " + _esc(p.range) + ".")
    if p.required:
        notes.append("Required.")
    if p.repeatable and not p.is_argument:
        notes.append("May be given more than once.")
    if p.envvars:
        notes.append("Environment: " + ", ".join(_b(v) for v in p.envvars) + ".")
    text = _man_text(p.help, first=None, then=".IP")
    if notes and any(line in (".IP", ".br", ".RE") for line in text):
        notes.insert(0, ".IP")  # after several paragraphs or a list: a paragraph of their own
    return [".TP", tag, *text, *notes]


def _man_params(params: tuple[Param, ...]) -> list[str]:
    return [line for p in params for line in _man_param(p)]


def _man_header(title: str, summary: str) -> list[str]:
    return [
        r".\" Generated from lrtool/cli.py by `python -m lrtool.docs` (make docs): do not edit.",
        f'.TH {_esc(title.upper())} 1 "" "{PROG} {_esc(__version__)}" "{PROG} manual"',
        ".nh",  # no hyphenation: option names must not break
        ".ad l",
        ".SH NAME",
        f"{_esc(title)} \\- {_esc(summary)}",
    ]


def _man_exit_status() -> list[str]:
    lines = [".SH EXIT STATUS"]
    for code, meaning in EXIT_STATUS:
        lines += [".TP", _b(str(code)), _esc(meaning)]
    return lines


def _page_name(cmd: Command) -> str:
    return "-".join((PROG, *cmd.path[:1]))


def _root_page(root: Command) -> str:
    lines = _man_header(PROG, root.summary)
    lines += [".SH SYNOPSIS", _man_synopsis(root), ".SH DESCRIPTION", *_man_text(root.help)]
    prose, examples = _examples(root.epilog)
    lines += _man_text(prose)
    lines += [".SH OPTIONS", *_man_params(root.params), ".SH COMMANDS"]
    for verb in root.subcommands:
        lines += [".TP", _b(verb.path[0]), _esc(verb.summary)]
        below = [" ".join(c.path[1:]) for c in verb.walk() if not c.is_group]
        if verb.is_group and below:
            lines.append("Subcommands: " + ", ".join(_b(name) for name in below) + ".")
        lines.append(f"See {_b(_page_name(verb))}(1).")
    if examples:
        lines += [".SH EXAMPLES", *_man_verbatim(examples)]
    lines += _man_exit_status()
    lines += [".SH ENVIRONMENT"]
    for name, meaning in ENVIRONMENT:
        lines += [".TP", _b(name), _esc(meaning)]
    for cmd in root.walk():
        for p in cmd.params:
            for var in p.envvars:
                what = _b(p.opts[-1]) if p.opts else _i(p.metavar)
                lines += [".TP", _b(var), f"Sets {what} of {_b(cmd.name)}."]
    lines += [".SH SEE ALSO", ", ".join(f"{_b(_page_name(verb))}(1)" for verb in root.subcommands)]
    return "\n".join(lines) + "\n"


def _verb_page(verb: Command) -> str:
    lines = _man_header(_page_name(verb), verb.summary)
    lines.append(".SH SYNOPSIS")
    leaves = [c for c in verb.walk() if not c.is_group] or [verb]
    for n, cmd in enumerate(leaves):
        lines += [".br"] * bool(n) + [_man_synopsis(cmd)]
    lines += [".SH DESCRIPTION", *_man_text(verb.help)]
    prose, examples = _examples(verb.epilog)
    lines += _man_text(prose)
    if verb.arguments:
        lines += [".SH ARGUMENTS", *_man_params(verb.arguments)]
    lines += [".SH OPTIONS", *_man_params(verb.options)]
    if examples:
        lines += [".SH EXAMPLES", *_man_verbatim(examples)]
    if verb.is_group:
        lines.append(".SH COMMANDS")
        for cmd in list(verb.walk())[1:]:
            lines += _man_subcommand(cmd)
    lines += _man_exit_status()
    lines += [".SH SEE ALSO", f"{_b(PROG)}(1)"]
    return "\n".join(lines) + "\n"


def _man_subcommand(cmd: Command) -> list[str]:
    lines = [f'.SS "{_esc(cmd.name)}"', _man_synopsis(cmd), *_man_text(cmd.help)]
    prose, examples = _examples(cmd.epilog)
    lines += _man_text(prose)
    if cmd.arguments:
        lines += [".PP", r"\fBArguments:\fR", *_man_params(cmd.arguments)]
    lines += [".PP", r"\fBOptions:\fR", *_man_params(cmd.options)]
    if examples:
        lines += [".PP", r"\fBExamples:\fR", *_man_verbatim(examples)]
    return lines


# ---------------------------------------------------------------------------------------------- completions

_GENERATED = "generated from lrtool/cli.py by `python -m lrtool.docs` (make docs): do not edit."


def _sh(text: str) -> str:
    """A single-quoted POSIX shell word (bash, zsh)."""
    return "'" + text.replace("'", "'\\''") + "'"


def _bash_case(function: str, comment: str, rows: list[tuple[str, str]]) -> list[str]:
    lines = [f"{function}() {{  # {comment}", "    case $1 in"]
    lines += [f"        {_sh(key)}) REPLY={_sh(value)} ;;" for key, value in rows]
    return lines + ["        *) REPLY='' ;;", "    esac", "}", ""]


def _bash(root: Command) -> str:
    commands = list(root.walk())
    words = " ".join
    groups = [c for c in commands if c.subcommands]
    subcommands = [(words(c.path), words(s.path[-1] for s in c.subcommands)) for c in groups]
    options = [(words(c.path), words(o for p in c.options for o in p.opts)) for c in commands]
    valued = [(words(c.path), words(o for p in c.options if p.takes_value for o in p.opts)) for c in commands]
    choices = [
        (f"{words(c.path)}|{o}", words(p.choices))
        for c in commands
        for p in c.options
        if p.takes_value and p.choices
        for o in p.opts
    ]
    lines = [
        f"# bash completion for {PROG}, {_GENERATED}",
        "# Use: source it from ~/.bashrc, or copy it to ~/.local/share/bash-completion/completions/lrtool.",
        "",
        *_bash_case("_lrtool_subcommands", "subcommands of a group, by its words after lrtool", subcommands),
        *_bash_case("_lrtool_options", "every option spelling of a command", options),
        *_bash_case("_lrtool_value_options", "the options that take a value", valued),
        *_bash_case("_lrtool_choices", "the values an option takes, by 'command|option'", choices),
    ]
    lines += r"""_lrtool() {
    local REPLY word path='' opt='' prefix='' i=1 cur=${COMP_WORDS[COMP_CWORD]}
    COMPREPLY=()
    # Follow the words before the cursor: descend into subcommands, step over option values.
    while ((i < COMP_CWORD)); do
        word=${COMP_WORDS[i]}
        if [[ $word == -- ]]; then
            return 0  # only arguments follow: file names (-o default)
        elif [[ $word == -* ]]; then
            _lrtool_value_options "$path"
            if [[ " $REPLY " == *" $word "* ]]; then
                ((i++))
                [[ ${COMP_WORDS[i]} == = ]] && ((i++))  # --opt=VALUE, split at '=' by COMP_WORDBREAKS
            fi
        else
            _lrtool_subcommands "$path"
            [[ " $REPLY " == *" $word "* ]] && path=${path:+$path }$word
        fi
        ((i++))
    done
    # The word at the cursor may be an option's value: --opt VALUE, or --opt=VALUE whether or not
    # COMP_WORDBREAKS splits words at '='.
    if [[ $cur == = ]] && ((COMP_CWORD >= 2)); then
        opt=${COMP_WORDS[COMP_CWORD-1]} cur=''
    elif [[ ${COMP_WORDS[COMP_CWORD-1]} == = ]] && ((COMP_CWORD >= 3)); then
        opt=${COMP_WORDS[COMP_CWORD-2]}
    elif [[ $cur == -*=* ]]; then
        opt=${cur%%=*} prefix=${cur%%=*}= cur=${cur#*=}
    elif ((COMP_CWORD >= 1)); then
        opt=${COMP_WORDS[COMP_CWORD-1]}
    fi
    _lrtool_value_options "$path"
    if [[ $opt == -* && " $REPLY " == *" $opt "* ]]; then
        _lrtool_choices "$path|$opt"
        [[ -n $REPLY ]] && COMPREPLY=($(compgen -P "$prefix" -W "$REPLY" -- "$cur"))
        return 0  # no choices: file names (-o default)
    fi
    if [[ $cur == -* ]]; then
        _lrtool_options "$path"
    else
        _lrtool_subcommands "$path"
    fi
    [[ -n $REPLY ]] && COMPREPLY=($(compgen -W "$REPLY" -- "$cur"))
    return 0
}

complete -F _lrtool -o default lrtool""".splitlines()
    return "\n".join(lines) + "\n"


def _zsh_quote(text: str) -> str:
    """Backslashes before what _arguments and _describe read as syntax in a description or message."""
    return re.sub(r"([\\\[\]:])", r"\\\1", text)


def _zsh_action(p: Param) -> str:
    if p.completion == CHOICES:
        return "(" + " ".join(re.sub(r"([^\w.,+@%/=-])", r"\\\1", c) for c in p.choices) + ")"
    return {FILES: "_files", DIRS: "_files -/"}.get(p.completion, " ")


def _zsh_option(p: Param) -> str:
    def spelling(opt: str) -> str:
        return opt + (("=" if _is_long(opt) else "+") if p.takes_value else "")

    description = f"[{_zsh_quote(_summary(p.help))}]" if p.help else ""
    value = f":{_zsh_quote(p.metavar)}:{_zsh_action(p)}" if p.takes_value else ""
    prefix = "*" if p.repeatable else f"({' '.join(p.opts)})" if len(p.opts) > 1 else ""
    if len(p.opts) == 1:
        return _sh(prefix + spelling(p.opts[0]) + description + value)
    return _sh(prefix) + "{" + ",".join(spelling(o) for o in p.opts) + "}" + _sh(description + value)


def _zsh_argument(p: Param) -> str:
    position = "*" if p.repeatable else "" if p.required else ":"
    return _sh(f"{position}:{_zsh_quote(p.metavar)}:{_zsh_action(p)}")


def _zsh_function(cmd: Command) -> str:
    return "_" + "_".join(re.sub(r"\W", "_", word) for word in (PROG, *cmd.path))


def _zsh_command(cmd: Command) -> list[str]:
    specs = [_zsh_option(p) for p in cmd.options]
    if not cmd.is_group:
        specs += [_zsh_argument(p) for p in cmd.arguments]
        body = ["_arguments -s -S \\", *(f"  {spec} \\" for spec in specs)]
        body[-1] = body[-1].removesuffix(" \\")
        return [f"{_zsh_function(cmd)}() {{", *(f"  {line}" for line in body), "}", ""]
    specs += ["'1: :->command'", "'*:: :->argument'"]
    lines = [
        f"{_zsh_function(cmd)}() {{",
        "  local curcontext=$curcontext state state_descr line ret=1",
        "  typeset -A opt_args",
        "  _arguments -C -s -S \\",
        *(f"    {spec} \\" for spec in specs[:-1]),
        f"    {specs[-1]} && ret=0",
        "  case $state in",
        "    (command)",
        "      local -a commands=(",
        *(f"        {_sh(_zsh_quote(s.path[-1]) + ':' + s.summary)}" for s in cmd.subcommands),
        "      )",
        f"      _describe -t commands {_sh(cmd.name + ' command')} commands && ret=0",
        "      ;;",
        "    (argument)",
        f"      curcontext=${{curcontext%:*:*}}:{'-'.join((PROG, *cmd.path))}-$words[1]:",
        "      case $words[1] in",
        *(f"        ({s.path[-1]}) {_zsh_function(s)} && ret=0 ;;" for s in cmd.subcommands),
        "      esac",
        "      ;;",
        "  esac",
        "  return ret",
        "}",
        "",
    ]
    return lines


def _zsh(root: Command) -> str:
    lines = [f"#compdef {PROG}", f"# zsh completion for {PROG}, {_GENERATED}", ""]
    for cmd in root.walk():
        lines += _zsh_command(cmd)
    lines += [
        "if [[ $zsh_eval_context[-1] == loadautofunc ]]; then",
        '  _lrtool "$@"  # autoloaded from $fpath',
        "else",
        "  compdef _lrtool lrtool  # sourced",
        "fi",
    ]
    return "\n".join(lines) + "\n"


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_condition(cmd: Command, root: Command) -> str:
    """fish sees the words so far; the words of `cmd`'s path, and no subcommand of it yet."""
    parts = [f"__fish_seen_subcommand_from {word}" for word in cmd.path]
    if cmd.subcommands:
        parts.append("not __fish_seen_subcommand_from " + " ".join(s.path[-1] for s in cmd.subcommands))
    return "; and ".join(parts)


def _fish_option(p: Param) -> str:
    words = []
    for opt in p.opts:
        flag = "-l" if opt.startswith("--") else "-s" if len(opt) == 2 else "-o"
        words.append(f"{flag} {opt.lstrip('-')}")
    if p.completion == CHOICES:
        words.append("-x -a " + _fish_quote(" ".join(p.choices)))
    elif p.takes_value:
        words.append("-r -F" if p.completion in (FILES, DIRS) else "-x")
    if p.help:
        words.append("-d " + _fish_quote(_summary(p.help)))
    return " ".join(words)


def _fish(root: Command) -> str:
    lines = [
        f"# fish completion for {PROG}, {_GENERATED}",
        "",
        f"complete -c {PROG} -f  # file names only where a value or an argument is one",
    ]
    for cmd in root.walk():
        condition = f"-n {_fish_quote(_fish_condition(cmd, root))}"
        lines += ["", f"# {cmd.name}"]
        for sub in cmd.subcommands:
            lines.append(f"complete -c {PROG} {condition} -a {sub.path[-1]} -d {_fish_quote(sub.summary)}")
        lines += [f"complete -c {PROG} {condition} {_fish_option(p)}" for p in cmd.options]
        for p in cmd.arguments:
            values = f"-a {_fish_quote(' '.join(p.choices))}" if p.choices else "-F"
            lines.append(f"complete -c {PROG} {condition} {values}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- files


def render(app: typer.Typer | None = None) -> dict[str, str]:
    """Every generated file: relative path -> text."""
    root = describe(app)
    files = {f"man/{PROG}.1": _root_page(root)}
    files.update({f"man/{_page_name(verb)}.1": _verb_page(verb) for verb in root.subcommands})
    files[f"completions/{PROG}.bash"] = _bash(root)
    files[f"completions/{PROG}.zsh"] = _zsh(root)
    files[f"completions/{PROG}.fish"] = _fish(root)
    return files


def generate(outdir: Path, app: typer.Typer | None = None) -> list[Path]:
    """Write the man pages and completions of `app` (lrtool's) under `outdir`; return the paths written.

    Pages of verbs that no longer exist (man/lrtool*.1 not written now) are removed: man/ is generated only.
    """
    outdir = Path(outdir)
    written = []
    for relative, text in render(app).items():
        path = outdir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
        written.append(path)
    for stale in sorted(set((outdir / "man").glob(f"{PROG}*.1")) - set(written)):
        stale.unlink()
    return written


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or args[:1] in (["-h"], ["--help"]):
        print(
            "usage: python -m lrtool.docs [OUTDIR]  (writes OUTDIR/man and OUTDIR/completions; OUTDIR: .)",
            file=sys.stdout if len(args) == 1 else sys.stderr,
        )
        sys.exit(2 if len(args) > 1 else 0)
    outdir = Path(args[0] if args else ".")
    written = generate(outdir)
    print(f"wrote {len(written)} files under {outdir}/man and {outdir}/completions", file=sys.stderr)


if __name__ == "__main__":
    main()
