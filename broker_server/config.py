"""The aggregation server's configuration: a validated, frozen dataclass from TOML and flags.

Unknown keys and bad values fail with the key and the source. This module holds no behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from broker_server.methods import METHODS
from broker_server.slots import DEFAULT_KEEP
from edge_runtime.config_file import build_config, config_values, read_secret

HEAD_WEIGHTINGS = ("samples", "labels")  # ServerConfig.head_weighting
MAX_LOGIT_PRIOR = 10.0  # tau beyond this only multiplies a prior whose lacking labels are already ~5 nats down

# Named settings (`--recipe`, or `recipe` in the TOML); anything set explicitly wins. label-aware is the
# configuration that leads FedIT at Dirichlet(0.1) in docs/METHOD.md ("label-head-router0"): devices train
# against their own label prior and send back only the head rows of labels they hold, head row y is
# averaged over the devices' samples of y (so devices report label counts; they may send a private
# release, `label_count_epsilon`), and the served gate stays at its initial rows while devices adapt
# theirs within each round. router_lr is FFT-MoE's: the LoRA baselines take the rest.
RECIPES = {"paper": {},
           "label-aware": {"logit_prior": 1.0, "own_labels_only": True, "head_weighting": "labels", "router_lr": 0.0}}


def recipe_flags(recipe: str) -> str:
    """The recipe as the command-line flags it stands for (for help texts)."""
    def flag(key, value):
        name = "--" + key.replace("_", "-")
        return name if value is True else f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
    return " ".join(flag(k, v) for k, v in RECIPES[recipe].items())


def recipe_settings(recipe: str, method: str) -> dict:
    """The settings `recipe` sets for `method` (an unknown recipe sets none; the config refuses it)."""
    settings = RECIPES.get(recipe, {})
    return settings if method == "fft-moe" else {k: v for k, v in settings.items() if k != "router_lr"}


class ServerConfigError(ValueError):
    """A server setting is invalid; the message names it and its source."""


@dataclass(frozen=True)
class ServerConfig:
    artifacts: str  # export folder with manifest.json and global_init.npz
    state_dir: str = "fftmoe-server-state"
    federation: str = "default"
    broker: str | None = None  # external broker URL; None starts the embedded broker
    host: str = "127.0.0.1"  # embedded broker bind address
    port: int = 1883  # embedded broker port (0: any free port)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password_file: str | None = None
    rounds: int = 5  # rounds to complete in this state folder (0: run until stopped)
    min_devices: int = 1  # registered, online devices needed before a round starts
    fraction: float = 1.0  # share of online devices sampled per round
    min_participants: int = 1  # at least this many sampled (if online)
    min_updates: int = 1  # updates needed to aggregate; fewer and the round is retried
    round_deadline_s: float = 300.0
    resend_interval_s: float = 30.0  # open tasks are re-sent at this interval (and on a Hello) until answered
    max_attempts: int = 3  # tries per round before waiting for more devices
    local_steps: int = 20
    learning_rate: float = 1e-3
    lambda_bal: float = 0.01
    lambda_het: float = 0.01
    gamma: float = 1.0
    logit_prior: float = 0.0  # tau of the devices' label prior in their training logits (RoundTask.logit_prior)
    own_labels_only: bool = False  # devices update only the head rows of labels they hold (RoundTask)
    head_weighting: str = "samples"  # head row y weighted by |D_n| ("samples") or the device's samples of y ("labels")
    upload_dtype: str = "float32"
    method: str = "fft-moe"  # or a LoRA baseline: fedit, hetlora, flexlora (needs a LoRA export)
    weighting: str = "samples"
    optimizer: str = "fedavg"
    server_lr: float = 1e-2
    personalise_router: bool = False
    slot_keep: float = DEFAULT_KEEP  # share of a device's slots kept on its most-used experts (slots.py); 0: coverage
    router_lr: float = 1.0  # server step on router rows (FedAvg): 1 averages them, 0 keeps the global gate
    clip_multiplier: float | None = None
    norm_policy: str = "clip"  # above clip_multiplier x previous median: "clip" or "reject"
    audit_log: bool = False  # write every folded update to STATE/audit/ (replayable; disk: clients x model)
    exact: bool = False  # fold into exact integer sums (exact_sums.py): order-free, the bits sharding gives
    workers: int = 0  # > 0: coordinate this many `fftmoe serve --worker` processes, which fold (coordinator.py)
    close_timeout_s: float = 60.0  # a worker's partial sums must arrive within this after the close
    seed: int = 0
    recipe: str = "paper"  # RECIPES: named defaults under the other settings
    model_out: str | None = None  # write the served global model here when the rounds are done (global_model.py)
    test_data: str | None = None  # labelled CSV / JSON Lines / Parquet: the global model's accuracy after each round
    chunk_size: int = 256 * 1024
    max_update_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        checks = [
            (self.rounds >= 0, "rounds must be >= 0"),
            (self.min_devices >= 1 and self.min_participants >= 1 and self.min_updates >= 1,
             "min_devices, min_participants and min_updates must be >= 1"),
            (self.min_updates <= max(self.min_participants, self.min_devices) or self.fraction > 0,
             "min_updates cannot exceed the devices sampled"),
            (0 < self.fraction <= 1, "fraction must be in (0, 1]"),
            (self.round_deadline_s > 0 and self.resend_interval_s > 0, "deadlines must be > 0"),
            (self.max_attempts >= 1 and self.local_steps >= 1, "max_attempts and local_steps must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.lambda_bal >= 0 and self.lambda_het >= 0 and self.gamma >= 0, "lambdas and gamma must be >= 0"),
            (0 <= self.logit_prior <= MAX_LOGIT_PRIOR, f"logit_prior must be in [0, {MAX_LOGIT_PRIOR:g}]"),
            (self.upload_dtype in ("float32", "float16"), "upload_dtype must be float32 or float16"),
            (self.head_weighting in HEAD_WEIGHTINGS, f"head_weighting must be one of {', '.join(HEAD_WEIGHTINGS)}"),
            (0 <= self.port <= 65535, "port must be in [0, 65535]"),
            (self.chunk_size >= 1024, "chunk_size must be >= 1024"),
            (self.norm_policy in ("clip", "reject"), "norm_policy must be 'clip' or 'reject'"),
            (0 <= self.router_lr <= 1, "router_lr must be in [0, 1]"),
            (0 <= self.slot_keep <= 1, "slot_keep must be in [0, 1]"),
            (self.router_lr == 1 or self.optimizer == "fedavg", "router_lr applies to the fedavg optimizer only"),
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}"),
            (self.recipe in RECIPES, f"recipe must be one of {', '.join(RECIPES)}"),
            (self.workers >= 0 and self.close_timeout_s > 0, "workers must be >= 0 and close_timeout_s > 0"),
            (not (self.workers and self.audit_log), "audit_log needs the updates in this process; with workers "
             "they are folded elsewhere"),
            (self.method == "fft-moe" or not (self.exact or self.workers or self.audit_log or self.personalise_router
                                               or self.clip_multiplier or self.router_lr != 1
                                               or self.optimizer != "fedavg" or self.weighting != "samples"
                                               or self.slot_keep != DEFAULT_KEEP),
             "exact, workers, audit_log, personalise_router, router_lr, slot_keep, clip_multiplier, optimizer and "
             "weighting are "
             "FFT-MoE options; the LoRA "
             "baselines run plain sample-weighted FedAvg as published"),
        ]
        for ok, message in checks:
            if not ok:
                raise ServerConfigError(message)

    def password(self) -> str | None:
        return read_secret(self.password_file, ServerConfigError)


def load_server_config(path: str | Path | None, overrides: dict) -> ServerConfig:
    """Read an optional TOML file, apply non-None overrides, validate; a recipe's settings go under both."""
    values, source = config_values(ServerConfig, path, overrides, ("artifacts",), ServerConfigError, "server config")
    config = build_config(ServerConfig, values, source, ServerConfigError)
    settings = recipe_settings(config.recipe, config.method)
    if not settings:
        return config
    try:  # the values alone made a valid config, so an error now is the recipe's doing
        return build_config(ServerConfig, {**settings, **values}, source, ServerConfigError)
    except ServerConfigError as err:
        given = ", ".join(f"{k} = {v!r}" for k, v in settings.items())
        raise ServerConfigError(f"{err} (recipe {config.recipe!r} sets {given}; set one explicitly to override "
                                "it)") from err
