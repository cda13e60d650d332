"""What the app does besides drawing: check what a user typed, key and run a measurement,
and store it.  No streamlit here, so all of it is testable on its own; no maths either:
measurements come from the registry.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from layerscope.analysis.metric import Metric
from layerscope.analysis.runner import measure as run_measurements
from layerscope.analysis.store import DEFAULT_ROOT, package_versions, run_key
from layerscope.probes.corpus import LITERAL_PREFIX, STDLIB, CorpusSpec, TokenWindows, token_windows, user_path
from layerscope.probes.errors import UserError
from layerscope.probes.inputs import text_windows
from layerscope.probes.zoo import CONFIG_PREFIX, LoadedModel, ModelSpec, cache_dir, split_placement

MAX_TEXT_CHARS = 20_000
RUNS_DIR_ENV = "LAYERSCOPE_RUNS_DIR"
ALLOWED_DIRS_ENV = "LAYERSCOPE_ALLOWED_DIRS"
CORPUS_KINDS = ("text", "stdlib", "file")
# Typed text is measured whole, in windows of at most this many tokens; attention
# patterns grow with the square of the window.
TEXT_WINDOW_CAP = 512


@dataclass(frozen=True)
class AppSettings:
    """Where the app keeps runs and which folders a typed model or corpus path may read.

    `layerscope app` passes them to the Streamlit process through the environment, so the
    app file also runs under a plain `streamlit run`.
    """

    runs_dir: Path = DEFAULT_ROOT
    allowed_dirs: tuple[Path, ...] = ()
    max_text_chars: int = MAX_TEXT_CHARS

    @classmethod
    def from_env(cls) -> AppSettings:
        runs_dir = Path(os.environ.get(RUNS_DIR_ENV) or DEFAULT_ROOT)
        listed = [Path(p) for p in os.environ.get(ALLOWED_DIRS_ENV, "").split(os.pathsep) if p]
        return cls(runs_dir, tuple(listed) or default_allowed_dirs())

    def to_env(self) -> dict[str, str]:
        return {RUNS_DIR_ENV: str(self.runs_dir),
                ALLOWED_DIRS_ENV: os.pathsep.join(str(p) for p in self.allowed_dirs)}


def default_allowed_dirs() -> tuple[Path, ...]:
    return Path.cwd(), cache_dir()


def resolved_path(path: str, what: str) -> Path:
    """A typed path made absolute with symlinks followed; `~unknown`, a NUL byte or a link
    loop is one readable error."""
    try:
        return user_path(path, what).resolve()
    except (OSError, RuntimeError, ValueError) as err:
        raise UserError(f"{what} {path!r} cannot be resolved: {getattr(err, 'strerror', None) or err}") from None


def checked_folder(path: str, what: str) -> Path:
    """An existing folder a user named (say with `--allow-dir`), made absolute."""
    folder = resolved_path(path, what)
    if not folder.is_dir():
        raise UserError(f"{what} folder(s) not found: {path}")
    return folder


def _inside_allowed(path: str, what: str, allowed: tuple[Path, ...]) -> Path:
    # resolve() follows symlinks, so a link inside an allowed folder cannot point out of it.
    # Nothing is looked at before the check, so a refusal never tells whether a path exists.
    resolved = resolved_path(path, what)
    if not any(resolved.is_relative_to(resolved_path(str(folder), "allowed folder")) for folder in allowed):
        folders = ", ".join(str(folder) for folder in allowed)
        raise UserError(f"{what} {path!r} is outside the folders this app may read ({folders}); "
                        "start it with `layerscope app --allow-dir FOLDER` to add one")
    return resolved


def checked_model_name(name: str, settings: AppSettings) -> str:
    """A zoo name, a Hub id, or a local directory or `config:` file inside the allowed
    folders (made absolute, with any `@placement` kept)."""
    name = name.strip()
    if not name:
        raise UserError("no model chosen: pick a zoo model or type a local directory")
    base, placement = split_placement(name)
    if base.startswith(CONFIG_PREFIX):
        config = _inside_allowed(base.removeprefix(CONFIG_PREFIX), "config", settings.allowed_dirs)
        return f"{CONFIG_PREFIX}{config}" + (f"@{placement}" if placement else "")
    if ModelSpec(name).kind != "local":
        return name
    folder = _inside_allowed(name, "model path", settings.allowed_dirs)
    _refuse_custom_code(folder)
    return str(folder)


def _refuse_custom_code(folder: Path) -> None:
    # transformers asks on the terminal before running a model's own code; a server
    # must never reach that question, and layerscope never runs such code.
    for name in ("config.json", "tokenizer_config.json"):
        try:
            config = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and "auto_map" in config:
            raise UserError(f"{folder} needs its own Python code ({name} has an auto_map), "
                            "and layerscope never runs code shipped with a model")


@dataclass(frozen=True)
class CorpusChoice:
    """A checked corpus choice.  Typed text is measured whole: cut into windows of its own
    length up to `TEXT_WINDOW_CAP` tokens, so `seq_len` and `max_tokens` apply to the
    stdlib and file corpora only."""

    kind: str
    source: str
    seq_len: int
    max_tokens: int
    batch_size: int = 8

    def identity(self) -> dict:
        identity = asdict(self)
        if self.kind == "text":
            identity.update(seq_len=None, max_tokens=None, text_window_cap=TEXT_WINDOW_CAP)
        elif self.kind == "stdlib":
            identity["python"] = package_versions()["python"]
        else:
            # The size, mtime and hash of the first bytes, as the windows record: cheap on
            # every rerun of the page, however large the file.
            from layerscope.probes.corpus import file_identity

            identity["file"] = file_identity(self.source)
        return identity

    def windows_for(self, loaded: LoadedModel) -> TokenWindows:
        """The windows to measure: typed text whole (as `layerscope.text_windows`), the
        stdlib and file corpora cut into `seq_len` windows up to `max_tokens`."""
        if self.kind == "text":
            return text_windows(loaded, self.source.removeprefix(LITERAL_PREFIX), self.batch_size,
                                max_length=TEXT_WINDOW_CAP)
        return token_windows(CorpusSpec(self.source, self.seq_len, self.max_tokens, self.batch_size),
                             loaded.tokenizer, loaded.bos_token_id, loaded.max_context)


def corpus_choice(kind: str, text: str, path: str, seq_len: int, max_tokens: int,
                  settings: AppSettings) -> CorpusChoice:
    """Check what the user chose: typed text (capped), the stdlib docstrings, or an allowed file."""
    if kind == "text":
        if not text.strip():
            raise UserError("the text is empty: type or paste the text to measure")
        if len(text) > settings.max_text_chars:
            raise UserError(f"the text has {len(text):,} characters, over the cap of {settings.max_text_chars:,}; "
                            "shorten it, or save it as a .txt file in an allowed folder and choose 'file'")
        return CorpusChoice(kind, LITERAL_PREFIX + text, 0, 0)
    if kind == "stdlib":
        return CorpusChoice(kind, STDLIB, seq_len, max_tokens)
    if kind == "file":
        if not path.strip():
            raise UserError("no corpus file given: type the path of a .txt or .jsonl file")
        resolved = _inside_allowed(path.strip(), "corpus file", settings.allowed_dirs)
        if not resolved.is_file():
            raise UserError(f"corpus file {path.strip()!r} does not exist")
        return CorpusChoice(kind, str(resolved), seq_len, max_tokens)
    raise UserError(f"unknown corpus kind {kind!r}; choose one of {', '.join(CORPUS_KINDS)}")


def measurement_key(metric: Metric, model: str, corpus: CorpusChoice, options, backend: str,
                    placement: tuple[str, str] = ("auto", "auto")) -> str:
    """The store key of a measurement: same model, corpus content and settings, same key."""
    identity = {"metric": metric.name, "model": model, "corpus": corpus.identity(), "options": asdict(options),
                "backend": backend}
    if placement != ("auto", "auto"):
        identity["device"], identity["dtype"] = placement
    return run_key(identity)


class StageProgress:
    """Turns the runner's `progress(done, total, stage)` calls into the bar's fraction and
    text: each stage (the pass, then each replay) fills 10% to 90%, with the time it has
    taken and an estimate of the time left once a step has finished."""

    def __init__(self, on_stage: Callable[[float, str], None], what: str, clock: Callable[[], float] = time.monotonic):
        self.on_stage, self.what, self.clock = on_stage, what, clock
        self.stage, self.started = None, clock()

    def __call__(self, done: int, total: int, stage: str) -> None:
        if stage != self.stage:
            self.stage, self.started = stage, self.clock()
        elapsed = self.clock() - self.started
        text = f"{self.what} · {stage}: {done} of {total}"
        if done and total:
            text += f" · {elapsed:.0f} s, about {elapsed / done * (total - done):.0f} s left"
        self.on_stage(0.1 + 0.8 * (done / total if total else 0.0), text)


def measure(metric: Metric, loaded: LoadedModel, corpus: CorpusChoice, options, key: str, settings: AppSettings,
            backend: str = "hooks", on_stage: Callable[[float, str], None] = lambda fraction, text: None) -> str:
    """Run one measurement and store it under `key`; returns the run id.

    `on_stage(fraction, text)` reports each stage for a progress bar.
    """
    on_stage(0.05, "tokenising the corpus")
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        windows = corpus.windows_for(loaded)
    metric.check_applies(loaded)
    what = f"{metric.name} on {windows.n_tokens:,} tokens of {loaded.spec.name}"
    on_stage(0.1, f"measuring {what}")
    result = run_measurements(loaded, windows, [metric.name], options={metric.name: options}, backend=backend,
                              progress=StageProgress(on_stage, what))
    result.manifest["key"] = key
    result.manifest["notes"] = [*result.manifest.get("notes", []), *(str(w.message) for w in told)]
    on_stage(0.9, "saving the run")
    run_id = result.save(settings.runs_dir).name
    on_stage(1.0, f"stored as {run_id}")
    return run_id
