"""How every app starts: ``run_app`` strips ``--debug``, composes and validates the command line (every job of
a sweep) so a bad input ends in what / why / fix with exit 2 before anything is built, then lets Hydra run."""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
from typing import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from genflow.config.composing import APPS, compose_config, hydra_error
from genflow.config.schema import check_schema
from genflow.config.validation import bare_items, compose, knob_overrides
from genflow.errors import config_error, exit_on_error, strip_debug_flag
from genflow.progress import Phase


HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--package", "-p",
               "--shell-completion", "-sc", "--version")


def sweep_variants(overrides: list[str]) -> list[list[str]]:
    """For a multirun: every value of every sweep (the other sweeps at their first value)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    base = [o.input_line if not o.is_sweep_override() else f"{o.get_key_element()}={next(o.sweep_string_iterator())}"
            for o in parsed]
    variants = [base]
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            for value in list(o.sweep_string_iterator())[1:]:
                variants.append(base[:i] + [f"{o.get_key_element()}={value}"] + base[i + 1:])
    return variants


def preflight(config_name: str, validator=None, argv: Sequence[str] | None = None) -> None:
    """Before Hydra runs an app: compose the command line's overrides and validate them, so a bad input is
    reported as what / why / fix with exit 2 before anything is built or written."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a.split("=")[0] in HYDRA_FLAGS for a in args):
        return  # --help / --cfg job / --info: Hydra answers, nothing runs
    overrides = [a for a in args if not a.startswith("-")]
    try:
        variants = sweep_variants(overrides) if ("-m" in args or "--multirun" in args) else [overrides]
    except (HydraException, OmegaConfBaseException) as err:
        raise hydra_error(err, config_name) from err
    for variant in variants:
        compose(variant, config_name, return_hydra_config=True, validator=validator)


def with_knobs(config_name: str, args: Sequence[str]) -> list[str]:
    """The command line as Hydra must read it: a bare knob (``D=64``, ``D=64,128`` in a sweep) written ``+D=...``,
    since the key exists only once the chosen model declares it."""
    args = list(args)
    overrides = [a for a in args if not a.startswith("-")]
    if config_name != "train" or not bare_items(overrides, config_name) or \
            any(a.split("=")[0] in ("--help", "-h", "--hydra-help") for a in args):
        return args
    multirun = "-m" in args or "--multirun" in args
    try:
        variant = sweep_variants(overrides)[0] if multirun else overrides
    except (HydraException, OmegaConfBaseException) as err:
        raise hydra_error(err, config_name) from err
    keys = {o.lstrip("+").split("=", 1)[0] for o in knob_overrides(variant, config_name) if o.startswith("+") and o not in variant}
    return [f"++{a}" if not a.startswith("-") and a.split("=", 1)[0] in keys else a for a in args]


def run_app(hydra_main, config_name: str, validator=None) -> None:
    """The one way every entry point starts: ``--debug`` handled, the command line validated (exit 2 with
    what / why / fix on a bad input), then the Hydra app runs (its task wrapped in ``errors.reported``)."""
    strip_debug_flag()
    try:
        exit_on_error(preflight, config_name, validator)
        sys.argv[1:] = exit_on_error(with_knobs, config_name, sys.argv[1:])
    except KeyboardInterrupt:  # Ctrl-C while the command line is checked: one line, not a traceback
        print(Phase("checking the command line").line(signal.SIGINT), file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    try:
        hydra_main()
    except KeyboardInterrupt:  # where an app does not stop on its own terms (each says what it keeps)
        print("stopped by SIGINT", file=sys.stderr, flush=True)
        exit_quietly_on_signals()
        raise SystemExit(130) from None
    except SystemExit as done:
        if done.code in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # stopped by a signal: the process ends
            exit_quietly_on_signals()
        raise


def interrupt(signum, frame):
    """A SIGTERM handler: stop as Ctrl-C does (``KeyboardInterrupt(signum)``), so what an app keeps is kept."""
    raise KeyboardInterrupt(signum)


@contextlib.contextmanager
def one_line_on_stop(phase: Phase, *, sigterm: bool = True):
    """Ctrl-C (and SIGTERM, made to stop as Ctrl-C does, unless the app handles it: ``sigterm=False``) ends the
    block with ``phase``'s one line (what the app was doing, what it keeps, how to go on) and exit 128 + signal."""
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, interrupt) if sigterm and main_thread else None
    try:
        yield phase
    except KeyboardInterrupt as stop:
        signum = stop.args[0] if stop.args and isinstance(stop.args[0], int) else signal.SIGINT
        print(phase.line(signum), file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def run_plain(main, *args, phase: Phase) -> None:
    """How an app that runs no Hydra job starts (convert, dataset, bench): ``--debug`` handled, a genflow error
    is what / why / fix with exit 2, and Ctrl-C or SIGTERM end it with one line (``phase``: what it was doing and
    what it keeps), exit 130/143, every output written whole or not at all."""
    strip_debug_flag()
    try:
        with one_line_on_stop(phase):
            exit_on_error(main, *args)
    except SystemExit as done:
        if done.code in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # stopped: the process only ends
            exit_quietly_on_signals()
        raise


def exit_quietly_on_signals() -> None:
    """Once an app has stopped on a signal and said what it keeps, the process only ends (Lightning, torch and
    logging may take a moment to shut down): one more Ctrl-C or SIGTERM ends it at once with one line, rather
    than a KeyboardInterrupt traceback from the interpreter's shutdown."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def at_once(signum, frame):
        print(f"{signal.Signals(signum).name} again: stopped at once", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def ignore_from_now() -> None:  # at exit, before the interpreter resets its own handlers to the default
        for sig in (signal.SIGINT, signal.SIGTERM):  # (which would kill it silently mid-shutdown)
            if signal.getsignal(sig) is at_once:
                signal.signal(sig, signal.SIG_IGN)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, at_once)
    atexit.register(ignore_from_now)


def plain_app(config_name: str, argv: Sequence[str], description: str, *, schema: dict | None = None,
              passthrough: Sequence[str] = ()) -> tuple[DictConfig, list[str]]:
    """The command line of an app that runs no Hydra job (no run folder, no logging set-up: convert, bench, the
    plots) in the grammar of the others: Hydra's ``key=value`` overrides of ``configs/<config_name>.yaml``,
    checked against ``schema``; ``--help`` prints ``description`` and the config. Overrides of a key in
    ``passthrough`` (e.g. ``data=...``, ``data.root=...`` for convert: the stored training config's) are returned
    apart, for the training config. Returns (the app's config, the passed-through overrides)."""
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(f"{description.strip()}\n\nEvery key below is set as key=value (Hydra's override grammar); a bad "
              "value ends in `error: what / why / fix` and exit 2 (--debug: the traceback).\n\n== Config ==\n"
              f"{OmegaConf.to_yaml(compose_config([], config_name))}", end="", flush=True)
        raise SystemExit(0)
    for item in argv:
        if "=" not in item or item.startswith("-"):
            raise config_error(f"argument {item!r} is not key=value",
                               f"{APPS[config_name]} takes Hydra's key=value overrides, like every genflow app",
                               f"write key=value (e.g. {next(iter(schema or {'out': 0}))}=...); see "
                               f"`{APPS[config_name]} --help` for the keys")
    own = [a for a in argv if a.lstrip("+~").split("=", 1)[0].split(".", 1)[0] not in passthrough]
    cfg = compose(own, config_name, validator=False)
    if schema is not None:
        check_schema(cfg, schema, app=config_name, open_keys=())
    return cfg, [a for a in argv if a not in own]
