"""ESR experiments as validated config files and resumable runs.

A config (TOML, one per model in `experiments/`) names a model, its SAE, a judge, a prompt set,
sampling, latent sampling and calibration settings, and which experiments to run:

    exp1  ESR across models: each latent steered at its own calibrated threshold
    exp2  boost sweep: levels relative to each latent's own threshold (multiples of it)
    exp3  OTD ablation: the exp1 trials again with an off-topic-detector set (`esr otd find`)
          zero-ablated at the site, and with the SAE, where the detectors were found
    exp5  meta-prompts: the exp1 trials again with a self-monitoring instruction in the prompt
    exp8  no-steering baseline: the exp1 prompts and seeds with no intervention
    exp10 random-latent control: the exp1 trials with random latent sets of the OTD set's size,
          matched to it on firing frequency and mean activation, ablated the same way

Every experiment shares the same stages: sample latents -> calibrate -> trials -> judge. Trials of
different experiments share (latent, prompt, seed), so they pair for McNemar tests (row `id`).
Exp 3 and 10 store the latent sets they ablate in `ablation_sets.json`; a run directory ablates
one OTD set and one family of random sets, and refuses another (pass another --out).

A run directory holds `config.json` (resolved config and its hash), `versions.json`,
`latents.json`, `calibration.json`, `trials.jsonl` (one row per trial, appended with flush + fsync
per batch) and `log.jsonl` (stage timings). Re-running the same config resumes: trials whose key
(condition, latent, prompt, seed, value) is already in `trials.jsonl` are skipped, and a torn last
line left by a kill is cut off before appending.

A `[quick]` table in a config overrides keys for `--quick` runs (dotted keys: `latents.n = 6`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from esr.errors import EsrError
from esr.sae import sae_identity, same_sae

EXPERIMENTS = ("exp1", "exp2", "exp3", "exp5", "exp8", "exp10")
ABLATION_EXPERIMENTS = ("exp3", "exp10")
EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
_REQUIRED = object()

# section -> key -> (types, default). Types are checked strictly (bool is not an int).
SCHEMA: dict[str, dict[str, tuple[tuple, Any]]] = {
    "run": {
        "name": ((str,), _REQUIRED),
        "model": ((str,), _REQUIRED),
        "description": ((str,), ""),
        "sae": ((str,), ""),  # "" = the model registry's default SAE
        "site": ((str,), ""),  # steering site; "" = the registry's steering layer
        "judge": ((str,), "offline"),
        "prompts": ((str,), "howto"),  # howto | paper | a file
        "seed": ((int,), 0),
        "batch_size": ((int,), 32),
        "experiments": ((list,), ["exp1", "exp8"]),
    },
    "sampling": {
        "temperature": ((float, int), 0.6),
        "top_p": ((float, int), 1.0),
        "repetition_penalty": ((float, int), None),  # omitted = the model registry's
        "max_new_tokens": ((int,), 256),
    },
    "latents": {
        "n": ((int,), 40),
        "prompts_per_latent": ((int,), 5),
        "relevance": ((str,), "never_active"),
        "top_k": ((int,), 100),
        "label": ((str,), ""),
        "catalog": ((str,), ""),  # "" = catalog.jsonl.gz in the SAE directory, if any
        "exclude_dead": ((bool,), True),
    },
    "calibration": {
        "target": ((float, int), 0.3),
        "lower": ((float, int), 0.0),
        "upper": ((float, int), _REQUIRED),
        "prior_mean": ((float, int), _REQUIRED),
        "prior_std": ((float, int), _REQUIRED),
        "iterations": ((int,), 10),
        "samples_per_step": ((int,), 1),
        "grid": ((int,), 10_000),
        "verify": ((bool,), True),
    },
    "exp2": {
        "levels": ((list,), [0.5, 0.75, 1.0, 1.5, 2.0]),  # multiples of each latent's threshold
        "latents": ((int,), 0),  # first N calibrated latents (0 = all)
        "prompts_per_latent": ((int,), 3),
    },
    "exp3": {
        "otd": ((str,), ""),  # an OTD set file (`esr otd find`); relative = beside the config
    },
    "exp5": {
        "variants": ((list,), ["self_monitor"]),
    },
    "exp10": {
        "sets": ((int,), 3),  # random sets, each the OTD set's size
        "seed": ((int,), 0),
    },
}
# Sections that only say what exp 3 / 10 ablate: not part of the run hash, so adding the ablation
# experiments to a finished exp 1 run reuses its directory and pairs with its trials. What was
# ablated is pinned by ablation_sets.json in the run directory instead.
_UNHASHED = ("exp3", "exp10")


@dataclass
class ExperimentConfig:
    """A validated config: `data[section][key]`, every key present (defaults filled in)."""

    data: dict
    source: str = ""
    quick: bool = False

    def __getitem__(self, section: str) -> dict:
        return self.data[section]

    @property
    def name(self) -> str:
        return self.data["run"]["name"] + ("-quick" if self.quick else "")

    @property
    def experiments(self) -> list[str]:
        return list(self.data["run"]["experiments"])

    def hash(self) -> str:
        """Hash of everything but the list of experiments: adding exp 2 to a run that did exp 1
        reuses its directory, latents, thresholds and trials."""
        data = copy.deepcopy(self.data)
        data["run"].pop("experiments")
        for section in _UNHASHED:
            data.pop(section, None)
        blob = json.dumps({"config": data, "quick": self.quick}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_dict(self) -> dict:
        return {"config": copy.deepcopy(self.data), "quick": self.quick, "source": self.source,
                "hash": self.hash()}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _check_value(where: str, key: str, value, types: tuple) -> Any:
    number = float in types
    ok = isinstance(value, types) and not isinstance(value, bool) if bool not in types \
        else isinstance(value, bool)
    if not ok:
        want = ("a number" if number else {str: "a string", int: "an integer", bool: "true or false",
                                          list: "a list"}[types[0]])
        raise EsrError(f"{where}: {key} must be {want}, got {value!r}")
    if number:
        value = float(value)
        if not math.isfinite(value):
            raise EsrError(f"{where}: {key} must be a finite number, got {value!r}")
    return value


def validate(raw: dict, where: str, quick: bool = False) -> ExperimentConfig:
    """Check every section and key; fill defaults. Errors name the file and the key."""
    raw = dict(raw)
    overlay = raw.pop("quick", {})
    if not isinstance(overlay, dict):
        raise EsrError(f"{where}: [quick] must be a table of overrides")
    for section, body in raw.items():
        if section not in SCHEMA:
            raise EsrError(f"{where}: unknown section [{section}] (known: "
                           f"{', '.join(list(SCHEMA) + ['quick'])})")
        if not isinstance(body, dict):
            raise EsrError(f"{where}: {section} must be a table ([{section}])")
    for section, body in overlay.items():
        if section not in SCHEMA or not isinstance(body, dict):
            raise EsrError(f"{where}: quick.{section} is not a section of the config")
    merged = _merge(raw, overlay) if quick else raw
    data: dict = {}
    for section, keys in SCHEMA.items():
        body = merged.get(section, {})
        for key in body:
            if key not in keys:
                raise EsrError(f"{where}: unknown key {section}.{key} (known: {', '.join(keys)})")
        out = {}
        for key, (types, default) in keys.items():
            if key in body:
                out[key] = _check_value(where, f"{section}.{key}", body[key], types)
            elif default is _REQUIRED:
                raise EsrError(f"{where}: missing required key {section}.{key}")
            else:
                out[key] = copy.deepcopy(default)
        data[section] = out
    _check_semantics(data, where)
    return ExperimentConfig(data, source=where, quick=quick)


def _check_semantics(d: dict, where: str) -> None:
    from esr.latents import RELEVANCE
    from esr.prompts import META_PROMPTS

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise EsrError(f"{where}: {key} {msg}")

    run, s, lat, cal = d["run"], d["sampling"], d["latents"], d["calibration"]
    need(bool(run["name"].strip()) and "/" not in run["name"], "run.name",
         "must be a non-empty name without '/'")
    bad = [e for e in run["experiments"] if e not in EXPERIMENTS]
    need(bool(run["experiments"]) and not bad, "run.experiments",
         f"must list some of {', '.join(EXPERIMENTS)} (got {run['experiments']!r})")
    need(run["batch_size"] >= 1, "run.batch_size", "must be >= 1")
    need(run["seed"] >= 0, "run.seed", "must be >= 0")
    need(s["temperature"] >= 0, "sampling.temperature", "must be >= 0")
    need(0 < s["top_p"] <= 1, "sampling.top_p", "must be in (0, 1]")
    need(s["repetition_penalty"] is None or s["repetition_penalty"] > 0,
         "sampling.repetition_penalty", "must be > 0")
    need(s["max_new_tokens"] >= 1, "sampling.max_new_tokens", "must be >= 1")
    need(lat["n"] >= 1, "latents.n", "must be >= 1")
    need(lat["prompts_per_latent"] >= 1, "latents.prompts_per_latent", "must be >= 1")
    need(lat["relevance"] in RELEVANCE, "latents.relevance",
         f"must be one of {', '.join(RELEVANCE)} (got {lat['relevance']!r})")
    need(lat["top_k"] >= 1, "latents.top_k", "must be >= 1")
    need(0 < cal["target"] < 1, "calibration.target",
         "must be in (0, 1): a normalised score (0.3 = 30/100)")
    need(cal["upper"] > cal["lower"] >= 0, "calibration.upper", "must be > calibration.lower >= 0")
    need(cal["prior_std"] > 0, "calibration.prior_std", "must be > 0")
    need(cal["iterations"] >= 1, "calibration.iterations", "must be >= 1")
    need(cal["samples_per_step"] >= 1, "calibration.samples_per_step", "must be >= 1")
    need(cal["grid"] >= 10, "calibration.grid", "must be >= 10")
    levels = d["exp2"]["levels"]
    need(bool(levels) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                              and math.isfinite(x) and x >= 0 for x in levels)
         and len(set(levels)) == len(levels), "exp2.levels",
         "must be distinct non-negative numbers (multiples of each latent's threshold)")
    d["exp2"]["levels"] = [float(x) for x in levels]
    need(d["exp2"]["latents"] >= 0, "exp2.latents", "must be >= 0 (0 = all)")
    need(d["exp2"]["prompts_per_latent"] >= 1, "exp2.prompts_per_latent", "must be >= 1")
    bad = [v for v in d["exp5"]["variants"] if v not in META_PROMPTS]
    need(bool(d["exp5"]["variants"]) and not bad, "exp5.variants",
         f"must list some of {', '.join(META_PROMPTS)} (got {d['exp5']['variants']!r})")
    need(d["exp3"]["otd"] != "" or not set(ABLATION_EXPERIMENTS) & set(run["experiments"]),
         "exp3.otd", "must name an OTD set file (from `esr otd find`) to run exp3 or exp10")
    need(d["exp10"]["sets"] >= 1, "exp10.sets", "must be >= 1")
    need(d["exp10"]["seed"] >= 0, "exp10.seed", "must be >= 0")


def load_config(path: str | Path, quick: bool = False, overrides: dict | None = None) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise EsrError(f"{path}: no such experiment config")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise EsrError(f"{path}: invalid TOML ({e})") from None
    if overrides:
        raw = _merge(raw, overrides)
    config = validate(raw, str(path), quick=quick)
    prompts = config["run"]["prompts"]
    if prompts not in ("howto", "paper") and not Path(prompts).expanduser().is_absolute():
        beside = path.parent / prompts  # a relative prompt file is relative to the config
        if beside.is_file():
            config.data["run"]["prompts"] = str(beside.resolve())
    otd = config["exp3"]["otd"]
    if otd and not Path(otd).expanduser().is_absolute():  # beside the config, where it is kept
        config.data["exp3"]["otd"] = str((path.parent / otd).resolve())
    return config


def config_for_model(model: str) -> Path:
    """experiments/<model>.toml, the config `esr reproduce --model` runs."""
    path = EXPERIMENTS_DIR / f"{model}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))) or "none"
        raise EsrError(f"no experiment config for model {model!r} in {EXPERIMENTS_DIR} "
                       f"(configs: {known}); write one or run `esr run CONFIG`")
    return path


def resolve_config(config: ExperimentConfig) -> ExperimentConfig:
    """Fill registry defaults (SAE, steering site, repetition penalty) so the stored config says
    exactly what ran, and the hash changes when a registry default does."""
    from esr.models import resolve

    spec = resolve(config["run"]["model"])
    data = copy.deepcopy(config.data)
    run = data["run"]
    run["model"] = spec.name
    run["sae"] = run["sae"] or spec.default_sae
    if not run["sae"]:
        raise EsrError(f"model {spec.name} has no default SAE yet; pass --sae (a SAELens directory "
                       "or registry name) or set run.sae in the config")
    if not run["site"] and spec.steer_layer is not None:
        run["site"] = f"blocks.{spec.steer_layer}.hook_resid_post"
    if data["sampling"]["repetition_penalty"] is None:
        data["sampling"]["repetition_penalty"] = float(spec.repetition_penalty)
    return ExperimentConfig(data, config.source, config.quick)


# ----------------------------------------------------------------------------------------------
# Seeds and keys


def derive_seed(*parts) -> int:
    """A stable seed in [0, 1e6] from any parts (never Python's salted hash)."""
    h = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(h[:8], "big") % 1_000_001


def trial_key(condition: str, latent: int, prompt_index: int, seed: int, value: float) -> str:
    return f"{condition}|{latent}|{prompt_index}|{seed}|{value:.6g}"


@dataclass
class TrialSpec:
    experiment: str
    condition: str
    latent: int
    prompt_index: int
    seed: int
    value: float  # steering value in SAE units (0 = not steered)
    level: float | None = None  # exp2: multiple of the latent's threshold
    threshold: float | None = None
    variant: str | None = None  # exp5: meta-prompt variant
    ablate: tuple[int, ...] = ()  # exp3 / exp10: latents zero-ablated ...
    ablate_site: str = ""  # ... at this site (where their SAE reads)

    @property
    def key(self) -> str:
        return trial_key(self.condition, self.latent, self.prompt_index, self.seed, self.value)

    @property
    def pair_id(self) -> str:
        return f"{self.latent}:{self.prompt_index}:{self.seed}"


# ----------------------------------------------------------------------------------------------
# Trials file


class TrialsFile:
    """Append-only JSONL with resume: a torn last line is cut, keys already present are skipped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.keys: set[str] = set()
        self.judges: set[tuple[str, str]] = set()  # (judge id, protocol) of the rows' grades
        self._repair_and_index()

    def _repair_and_index(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with self.path.open("r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
            data = data[:cut]
        # split on "\n" only: str.splitlines() also breaks at U+2028 & co, which JSON keeps raw
        # inside strings, and a model's response can contain them.
        for line in data.decode("utf-8", errors="replace").split("\n"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("key"):
                self.keys.add(row["key"])
                j = row.get("judge")
                if isinstance(j, dict):
                    self.judges.add((str(j.get("id")), str(j.get("protocol"))))

    def append(self, rows: list[dict]) -> None:
        rows = [r for r in rows if r["key"] not in self.keys]
        if not rows:
            return
        blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        self.keys.update(r["key"] for r in rows)


def read_trials(path: str | Path) -> list[dict]:
    """Rows of trials.jsonl; a torn last line (an interrupted append) is skipped, any other bad
    line is an error: a trial must never vanish silently."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    lines = p.read_text(encoding="utf-8").split("\n")  # not splitlines(): see TrialsFile
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == last:
                continue
            raise EsrError(f"{p}:{i + 1}: corrupt trial row; fix or remove that line") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def package_versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("esr", "torch", "transformers", "sae-lens", "numpy", "anthropic", "openai"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def default_run_dir(config: ExperimentConfig) -> Path:
    return Path("runs") / f"{config.name}-{config.hash()[:10]}"


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    """One resolved config executing into one run directory."""

    config: ExperimentConfig  # resolved (see resolve_config)
    run_dir: Path
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))
    device: str | None = None
    device_map: str | None = None
    steerer: Any = None
    judge: Any = None
    otd: Any = None  # the OTD set exp 3 / 10 ablate (esr.otd.OTDSet), loaded by execute
    ablation: dict = field(default_factory=dict)  # ablation_sets.json: what exp 3 / 10 ablate

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        c = self.config
        self.prompts = _load_prompts(c["run"]["prompts"])
        from esr.generate import SamplingConfig

        s = c["sampling"]
        self.sampling = SamplingConfig(temperature=s["temperature"], top_p=s["top_p"],
                                       repetition_penalty=s["repetition_penalty"],
                                       max_new_tokens=s["max_new_tokens"])

    # ---- setup -------------------------------------------------------------------------------
    def _open_dir(self) -> None:
        d = self.run_dir
        d.mkdir(parents=True, exist_ok=True)
        import fcntl

        self._lock = (d / ".lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise EsrError(f"another `esr run` is writing {d}; wait for it or kill it") from None
        meta = d / "config.json"
        mine = self.config.to_dict()
        if meta.exists():
            try:
                theirs = json.loads(meta.read_text())
            except ValueError:
                raise EsrError(f"{meta} is not valid JSON; this is not an esr run directory") from None
            if theirs.get("hash") != mine["hash"]:
                raise EsrError(f"{d} holds a run of another config (hash {str(theirs.get('hash'))[:10]}, "
                               f"this one {mine['hash'][:10]}); pass another --out or remove it")
            done = theirs.get("config", {}).get("run", {}).get("experiments", [])
            mine["config"]["run"]["experiments"] = [e for e in EXPERIMENTS if e in
                                                    set(done) | set(self.config.experiments)]
        _write_json(meta, mine)
        _write_json(d / "versions.json", package_versions())

    def _log_stage(self, stage: str, seconds: float, **extra) -> None:
        with (self.run_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps({"stage": stage, "seconds": round(seconds, 2),
                                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}) + "\n")

    def _load(self) -> None:
        self.load_steerer()
        if self.judge is None:
            from esr.judge import default_cache_dir, make_judge

            self.judge = make_judge(self.config["run"]["judge"], cache_dir=default_cache_dir())

    def _check_judge(self) -> None:
        """A judge's protocol changes without the config changing (a better segmenter, say):
        resuming would then mix two gradings in one set of rates, so refuse."""
        mine = (str(self.judge.id), str(self.judge.protocol))
        other = TrialsFile(self.run_dir / "trials.jsonl").judges - {mine}
        if other:
            jid, proto = sorted(other)[0]
            raise EsrError(f"{self.run_dir} holds trials graded by {jid} protocol {proto}; this esr "
                           f"grades with protocol {mine[1]}: pass another --out for a fresh run")

    def load_steerer(self) -> None:
        if self.steerer is None:
            from esr.models import load_model
            from esr.sae import load_sae
            from esr.steer import Steerer

            run = self.config["run"]
            t = time.time()
            sae = load_sae(run["sae"], device=self.device or "cpu")
            lm = load_model(run["model"], device=self.device, device_map=self.device_map)
            if self.device is None:
                sae.to(lm.input_device)
            self.steerer = Steerer(lm, sae=sae, steer_site=run["site"] or None)
            self.log(f"loaded {run['model']} and SAE {run['sae']} ({time.time() - t:.0f}s)")

    # ---- ablation sets (exp 3, exp 10) ---------------------------------------------------------
    def attach_otd(self) -> None:
        """Load the OTD set, check it was found on this model with the SAE it names (by content),
        and make sure the Steerer can ablate with that SAE at the detectors' own site."""
        from esr.otd import load_otd_set
        from esr.sae import check_sae_fits, load_sae
        from esr.sites import Site
        from esr.steer import Steerer

        path = self.config["exp3"]["otd"]
        otd = load_otd_set(path)
        run = self.config["run"]
        if not _same_model(otd.model, run["model"]):
            raise EsrError(f"{path}: the OTD set was found on model {otd.model!r}, this run steers "
                           f"{run['model']!r}; find detectors on this model with `esr otd find`")
        ident = sae_identity(otd.sae)
        if ident.get("sha256") != otd.sae_sha256:
            raise EsrError(f"{path}: the OTD set was found with SAE {otd.sae} of sha256 "
                           f"{str(otd.sae_sha256)[:12]}, but that SAE is now {str(ident.get('sha256'))[:12]}"
                           "; re-run `esr otd find` with the SAE you steer with")
        st = self.steerer
        sae = st.sae if same_sae(ident, sae_identity(run["sae"])) else None
        if sae is None:
            sae = load_sae(otd.sae, device=self.device or "cpu")
            if self.device is None:
                sae.to(st.lm.input_device)
        site = Site.parse(otd.site)
        reads = check_sae_fits(sae, st.lm.d_model, st.lm.n_layers)
        if reads != site:
            raise EsrError(f"{path}: the OTD set names site {site} but its SAE {otd.sae} reads at "
                           f"{reads}; detectors are ablated only where their SAE reads")
        if st.saes_by_site.get(site) is not sae:
            extra = [x for s_, x in st.saes_by_site.items() if x is not st.sae and s_ != site]
            self.steerer = Steerer(st.lm, sae=st.sae, steer_site=st.steer_site,
                                   extra_saes=[*extra, sae])
        self.otd = otd
        self.log(f"OTD set: {len(otd.latents)} latents at {site} ({otd.sae})")

    def _matching_stats(self, sae) -> tuple[Any, Any, str]:
        """Per-latent firing frequency and mean activation that random sets are matched on:
        those the OTD search measured on its own contexts, else the SAE's latent catalog."""
        import numpy as np

        from esr.otd import activity_from_catalog

        d_sae = sae.cfg.d_sae
        act = self.otd.activity or {}
        if len(act.get("frequency") or ()) == d_sae and len(act.get("mean_activation") or ()) == d_sae:
            return (np.asarray(act["frequency"], float), np.asarray(act["mean_activation"], float),
                    f"the OTD search's {act.get('tokens', '?')} response tokens")
        from esr.catalog import sae_catalog

        cat = sae_catalog(self.otd.sae)
        if cat is not None:
            freq, mean = activity_from_catalog(cat, d_sae)
            return freq, mean, f"the latent catalog of {self.otd.sae}"
        raise EsrError(f"exp10 needs every latent's firing frequency and mean activation to match "
                       f"random sets to the OTD set: neither {self.config['exp3']['otd']} nor a "
                       f"latent catalog of {self.otd.sae} has them (build one with `esr sae catalog`)")

    def stage_ablation_sets(self, sample) -> dict:
        """ablation_sets.json: the OTD set and the matched random sets this run ablates. Written
        once; a later run in the same directory must ablate the same sets."""
        path = self.run_dir / "ablation_sets.json"
        otd = self.otd
        mine = {"latents": list(otd.latents), "site": otd.site, "sae": otd.sae,
                "sae_sha256": otd.sae_sha256, "model": otd.model, "file": self.config["exp3"]["otd"]}
        rec = json.loads(path.read_text()) if path.exists() else {}
        theirs = rec.get("otd")
        if theirs and {k: theirs.get(k) for k in ("latents", "site", "sae_sha256")} != \
                {k: mine[k] for k in ("latents", "site", "sae_sha256")}:
            raise EsrError(f"{self.run_dir} ablated another OTD set ({theirs.get('file')}, "
                           f"{len(theirs.get('latents', []))} latents); pass another --out")
        rec["otd"] = theirs or mine
        want = {"sets": self.config["exp10"]["sets"], "seed": self.config["exp10"]["seed"]}
        rnd = rec.get("random")
        if rnd and {k: rnd.get(k) for k in want} != want and "exp10" in self.config.experiments:
            raise EsrError(f"{self.run_dir} ran exp10 with {rnd.get('sets')} random sets and seed "
                           f"{rnd.get('seed')}, not {want['sets']} and {want['seed']}; keep "
                           "exp10.sets and exp10.seed or pass another --out")
        if rnd is None and "exp10" in self.config.experiments:
            from esr.otd import matched_random_sets

            sae = self.steerer.saes_by_site[self._otd_site()]
            freq, mean, source = self._matching_stats(sae)
            sets, report = matched_random_sets(otd.latents, freq, mean, want["sets"], want["seed"],
                                               exclude=sample.latents)
            rec["random"] = {**want, "stats_source": source,
                             "excluded": "the OTD set and the steered latents",
                             "latents": [list(x) for x in sets], "matching": report}
            self.log(f"exp10: {len(sets)} random sets of {len(otd.latents)} latents matched on "
                     f"firing frequency and mean activation ({source})")
        _write_json(path, rec)
        return rec

    def _otd_site(self):
        from esr.sites import Site

        return Site.parse(self.otd.site)

    def ablation_conditions(self, exp: str) -> list[tuple[str, tuple[int, ...]]]:
        """(condition, latents) for exp 3 or exp 10, from ablation_sets.json."""
        if exp == "exp3":
            return [("ablate_otd", tuple(self.ablation["otd"]["latents"]))]
        return [(f"ablate_random:{i}", tuple(x))
                for i, x in enumerate(self.ablation["random"]["latents"])]

    # ---- stages --------------------------------------------------------------------------------
    def execute(self) -> Path:
        self._open_dir()
        try:
            self._load()
            self._check_judge()
            ablating = bool(set(ABLATION_EXPERIMENTS) & set(self.config.experiments))
            if ablating:
                self.attach_otd()
                if "exp1" not in self.config.experiments:
                    self.log("note: exp3 / exp10 trials pair with exp 1's; run exp1 too if this "
                             "directory has none")
            sample = self.stage_latents()
            needs_threshold = bool({"exp1", "exp2", "exp5", *ABLATION_EXPERIMENTS}
                                   & set(self.config.experiments))
            thresholds = self.stage_calibrate(sample) if needs_threshold else {}
            if ablating:
                self.ablation = self.stage_ablation_sets(sample)
            plan = [(exp, self.trial_specs(exp, sample, thresholds))
                    for exp in ("exp1", "exp8", "exp2", "exp5", "exp3", "exp10")
                    if exp in self.config.experiments]
            self.log("trials: " + ", ".join(f"{exp} {len(specs)}" for exp, specs in plan))
            for exp, specs in plan:
                self.stage_trials(exp, specs, sample)
        finally:
            lock = getattr(self, "_lock", None)
            if lock:
                lock.close()
        return self.run_dir

    def stage_latents(self):
        from esr.latents import LatentSample, prompt_max_activations, sample_latents

        path = self.run_dir / "latents.json"
        if path.exists():
            return LatentSample.from_dict(json.loads(path.read_text()))
        t = time.time()
        c = self.config["latents"]
        sae = self.steerer.sae
        catalog = self._catalog()
        max_acts = None
        if c["relevance"] != "none":
            max_acts = prompt_max_activations(self.steerer.lm, sae, self.prompts)
        import torch

        norms = sae.W_dec.detach().float().norm(dim=1).cpu()
        zero_rows = set(torch.nonzero(norms == 0).flatten().tolist())
        sample = sample_latents(sae.cfg.d_sae, c["n"], self.config["run"]["seed"], max_acts=max_acts,
                                relevance=c["relevance"], top_k=c["top_k"], catalog=catalog,
                                label_pattern=c["label"], exclude_dead=c["exclude_dead"],
                                zero_rows=zero_rows)
        sel = norms[sample.latents]
        sample.stats["decoder_norm"] = {"min": round(float(sel.min()), 4),
                                        "median": round(float(sel.median()), 4),
                                        "max": round(float(sel.max()), 4)}
        if "short" in sample.stats:
            self.log(f"warning: {sample.stats['short']}")
        if c["exclude_dead"] and catalog is None:
            self.log("note: no latent catalog for this SAE, so only zero decoder rows count as dead")
        _write_json(path, sample.to_dict())
        self._log_stage("latents", time.time() - t, n=len(sample.latents))
        self.log(f"latents: {len(sample.latents)} sampled "
                 f"({sample.stats['survivors']} of {sample.stats['d_sae']} pass the filters)")
        return sample

    def _catalog(self):
        from esr.catalog import load_catalog, sae_catalog

        c = self.config["latents"]
        return load_catalog(c["catalog"]) if c["catalog"] else sae_catalog(self.config["run"]["sae"])

    def calibration_inputs(self, latent: int) -> dict:
        """Everything that decides a latent's threshold; its hash is the cache key."""
        from esr.prompts import prompts_hash

        c, run = self.config, self.config["run"]
        lm = self.steerer.lm
        return {
            "version": 1,
            "model": {"name": lm.spec.name, "repo": lm.spec.repo, "sha256": lm.spec.sha256,
                      "dtype": str(next(lm.model.parameters()).dtype)},
            "sae": sae_identity(run["sae"]),
            "site": str(self.steerer.steer_site),
            "latent": latent,
            "judge": {"id": self.judge.id, "protocol": self.judge.protocol},
            "sampling": self.sampling.to_dict(),
            "prompts": prompts_hash(self.prompts),
            "calibration": c["calibration"],
            "seed": run["seed"],
        }

    def stage_calibrate(self, sample) -> dict[int, dict]:
        from esr.calibrate import CalibrationCache, PBAConfig, cache_key, calibrate_many

        path = self.run_dir / "calibration.json"
        if path.exists():
            done = {int(k): v for k, v in json.loads(path.read_text()).items()}
            if set(done) == set(sample.latents):
                return done
        t = time.time()
        cal = self.config["calibration"]
        cfg = PBAConfig(target=cal["target"], lower=cal["lower"], upper=cal["upper"],
                        prior_mean=cal["prior_mean"], prior_std=cal["prior_std"],
                        iterations=cal["iterations"], grid=cal["grid"])
        cache = CalibrationCache()
        inputs = {j: self.calibration_inputs(j) for j in sample.latents}
        keys = {j: cache_key(inputs[j]) for j in sample.latents}
        results, todo = {}, []
        for j in sample.latents:
            hit = cache.get(keys[j])
            if hit is not None:
                results[j] = {**hit.to_dict(), "cache_key": keys[j], "cached": True}
            else:
                todo.append(j)
        self.log(f"calibration: {len(results)} latents cached, {len(todo)} to search "
                 f"({cal['iterations']} steps x {cal['samples_per_step']} samples)")
        if todo:
            from tqdm import tqdm

            n_steps = cal["iterations"] + (1 if cal["verify"] else 0)
            bar = tqdm(total=len(todo) * n_steps * cal["samples_per_step"], desc="calibrate",
                       unit="gen", disable=not self.progress, dynamic_ncols=True)

            def score_batch(step: int, values: dict) -> dict:
                return self._score_batch(step, values, sample, bar)

            out = calibrate_many(todo, cfg, score_batch, verify=cal["verify"])
            bar.close()
            for j, r in out.items():
                cache.put(keys[j], inputs[j], r)
                results[j] = {**r.to_dict(), "cache_key": keys[j], "cached": False}
        ordered = {str(j): results[j] for j in sample.latents}
        _write_json(path, ordered)
        failed = sum(r["error"] is not None for r in results.values())
        self._log_stage("calibrate", time.time() - t, searched=len(todo), failed=failed)
        return {int(k): v for k, v in ordered.items()}

    def _score_batch(self, step: int, values: dict, sample, bar) -> dict:
        """Mean normalised first-attempt score per latent at its value; None if no sample scored."""
        import numpy as np

        from esr.judge import GradeRequest
        from esr.steer import Steer

        cal, seed = self.config["calibration"], self.config["run"]["seed"]
        rows = []
        for j, v in values.items():
            for s in range(cal["samples_per_step"]):
                rng = np.random.default_rng(derive_seed(seed, "calibrate", j, step, s))
                p = int(rng.integers(len(self.prompts)))
                rows.append((j, p, derive_seed(seed, "calibrate-gen", j, step, s), float(v)))
        gens = self._generate([self.prompts[p] for _, p, _, _ in rows],
                              [[Steer(v, latent=j)] for j, _, _, v in rows],
                              [sd for _, _, sd, _ in rows], bar)
        reqs = [GradeRequest(self.prompts[p], g.text, sample.labels.get(j) or None)
                for (j, p, _, _), g in zip(rows, gens)]
        grades = self._grade(reqs)
        per: dict = {}
        for (j, _, _, _), g in zip(rows, grades):
            if g.ok and g.attempts and g.attempts[0].score is not None:
                per.setdefault(j, []).append(g.attempts[0].score / 100.0)
        return {j: (sum(per[j]) / len(per[j]) if j in per else None) for j in values}

    def _generate(self, prompts, interventions, seeds, bar=None):
        from esr.generate import generate

        out = []
        bs = self.config["run"]["batch_size"]
        for i in range(0, len(prompts), bs):
            out += generate(self.steerer, prompts[i:i + bs], interventions[i:i + bs], self.sampling,
                            seeds=seeds[i:i + bs], batch_size=bs)
            if bar is not None:
                bar.update(len(prompts[i:i + bs]))
        return out

    def _grade(self, reqs, retries: int = 2):
        """Grade; re-ask for failed grades a bounded number of times (never loops forever)."""
        grades = self.judge.grade_many(reqs)
        for _ in range(retries):
            bad = [i for i, g in enumerate(grades) if not g.ok]
            if not bad:
                break
            for i, g in zip(bad, self.judge.grade_many([reqs[i] for i in bad])):
                grades[i] = g
        return grades

    # ---- trials --------------------------------------------------------------------------------
    def prompt_indices(self, latent: int, n: int) -> list[int]:
        import numpy as np

        rng = np.random.default_rng(derive_seed(self.config["run"]["seed"], "prompts", latent))
        return [int(i) for i in rng.permutation(len(self.prompts))[:n]]

    def trial_specs(self, exp: str, sample, thresholds: dict) -> list[TrialSpec]:
        c, seed = self.config, self.config["run"]["seed"]
        ok = {j: r["threshold"] for j, r in thresholds.items() if r.get("error") is None
              and r.get("threshold") is not None}
        latents = [j for j in sample.latents if j in ok] if thresholds else list(sample.latents)
        n_prompts = c["latents"]["prompts_per_latent"]
        if exp in ABLATION_EXPERIMENTS:
            return self._ablation_specs(exp, self.trial_specs("exp1", sample, thresholds))
        specs = []
        if exp == "exp2":
            n_lat = c["exp2"]["latents"] or len(latents)
            latents, n_prompts = latents[:n_lat], c["exp2"]["prompts_per_latent"]
        for j in latents:
            for p in self.prompt_indices(j, n_prompts):
                s = derive_seed(seed, "trial", j, p)
                thr = ok.get(j)
                if exp == "exp1":
                    specs.append(TrialSpec(exp, "steered", j, p, s, thr, 1.0, thr))
                elif exp == "exp8":
                    specs.append(TrialSpec(exp, "unsteered", j, p, s, 0.0, 0.0, thr))
                elif exp == "exp2":
                    for lv in c["exp2"]["levels"]:
                        specs.append(TrialSpec(exp, f"boost_x{lv:g}", j, p, s, round(lv * thr, 4),
                                               lv, thr))
                elif exp == "exp5":
                    for v in c["exp5"]["variants"]:
                        specs.append(TrialSpec(exp, f"meta:{v}", j, p, s, thr, 1.0, thr, v))
        return specs

    def _ablation_specs(self, exp: str, base: list[TrialSpec]) -> list[TrialSpec]:
        """Exp 1's trials again with a latent set ablated. A trial whose steered latent is in the
        set is left out: ablating it would undo the steering, not the detection."""
        specs, skipped = [], 0
        site = self.otd.site
        for cond, latents in self.ablation_conditions(exp):
            for s in base:
                if s.latent in latents:
                    skipped += 1
                    continue
                specs.append(TrialSpec(exp, cond, s.latent, s.prompt_index, s.seed, s.value,
                                       s.level, s.threshold, ablate=latents, ablate_site=site))
        if skipped:
            self.log(f"{exp}: {skipped} trials left out: their steered latent is in the ablated set")
        return specs

    def _reuse_identical(self, exp: str, todo: list[TrialSpec], trials: TrialsFile, sample):
        """Generation is a function of (prompt, interventions, seed, sampling): a trial identical
        to one already run (exp 2's level 1.0 is exp 1's trial) is copied, not generated again."""
        if exp != "exp2":
            return todo
        done = {(r["latent"], r["prompt_index"], r["seed"], r["value"], r["user_message"]): r
                for r in read_trials(trials.path) if not r.get("error")}
        rows, rest = [], []
        for s in todo:
            r = done.get((s.latent, s.prompt_index, s.seed, s.value, self.prompts[s.prompt_index]))
            if r is None:
                rest.append(s)
            else:
                rows.append({**r, "key": s.key, "experiment": s.experiment,
                             "condition": s.condition, "level": s.level, "copied_from": r["key"]})
        trials.append(rows)
        if rows:
            self.log(f"{exp}: {len(rows)} trials identical to trials already run, copied")
        return rest

    def stage_trials(self, exp: str, specs: list[TrialSpec], sample) -> None:
        from tqdm import tqdm

        from esr.judge import GradeRequest
        from esr.prompts import apply_meta_prompt
        from esr.steer import Ablate, Steer

        trials = TrialsFile(self.run_dir / "trials.jsonl")
        todo = [s for s in specs if s.key not in trials.keys]
        if not todo:
            self.log(f"{exp}: all {len(specs)} trials already done")
            return
        t = time.time()
        todo = self._reuse_identical(exp, todo, trials, sample)
        bs = self.config["run"]["batch_size"]
        bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc=exp, unit="trial",
                   disable=not self.progress, dynamic_ncols=True)
        for i in range(0, len(todo), bs):
            chunk = todo[i:i + bs]
            users = [apply_meta_prompt(s.variant, self.prompts[s.prompt_index],
                                       sample.labels.get(s.latent)) if s.variant
                     else self.prompts[s.prompt_index] for s in chunk]
            ivs = [([Steer(s.value, latent=s.latent)] if s.value else [])
                   + ([Ablate(s.ablate, site=s.ablate_site)] if s.ablate else []) for s in chunk]
            t_gen = time.time()
            gens = self._generate(users, ivs, [s.seed for s in chunk])
            gen_s = time.time() - t_gen
            grades = self._grade([GradeRequest(self.prompts[s.prompt_index], g.text,
                                               sample.labels.get(s.latent) or None)
                                  for s, g in zip(chunk, gens)])
            rows = []
            for s, u, g, gr in zip(chunk, users, gens, grades):
                rows.append({
                    "key": s.key, "id": s.pair_id, "experiment": s.experiment,
                    "condition": s.condition, "model": self.config["run"]["model"],
                    "latent": s.latent, "label": sample.labels.get(s.latent, ""),
                    "prompt_index": s.prompt_index, "prompt": self.prompts[s.prompt_index],
                    "user_message": u, "variant": s.variant, "value": s.value, "level": s.level,
                    "threshold": s.threshold, "seed": s.seed,
                    "ablated": list(s.ablate) or None, "ablate_site": s.ablate_site or None,
                    "response": g.text,
                    "n_tokens": len(g.token_ids), "finish_reason": g.finish_reason,
                    "gen_seconds_batch": round(gen_s, 2), "error": None, **gr.to_row(),
                })
            trials.append(rows)
            bar.update(len(chunk))
        bar.close()
        self._log_stage(exp, time.time() - t, trials=len(todo))


def _load_prompts(spec: str) -> list[str]:
    from esr.prompts import load_prompts

    return load_prompts(spec)


def _same_model(a: str, b: str) -> bool:
    """Registry name, hub id or directory naming the same model."""
    from esr.models import resolve

    if a == b:
        return True
    try:
        return resolve(a).name == resolve(b).name
    except EsrError:
        return False
