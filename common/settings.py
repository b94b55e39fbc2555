"""One typed settings object, read once from the environment by each entry point.

The names follow Label Studio's own ML-backend conventions (``LABEL_STUDIO_URL``,
``LABEL_STUDIO_API_KEY``, ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``, ``MODEL_DIR``, ``REDIS_URL``).
Nothing below this module reads ``os.environ``: settings are passed down.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from common.errors import SettingsError

#: Words that are never a project's label but often fill a photo. Pixels and patches that CLIP
#: finds closer to these than to any label are "something else" instead of a forced guess.
DEFAULT_BACKGROUND_WORDS: tuple[str, ...] = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
    "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road",
    "rock", "street", "valley", "bridge", "sign",
)  # fmt: skip

#: Where Label Studio's storage resolver may redirect an image download (a presigned URL): the
#: public clouds' storage hosts. An S3-compatible server of your own (MinIO) is added by name.
DEFAULT_STORAGE_HOSTS: tuple[str, ...] = (
    "*.amazonaws.com", "storage.googleapis.com", "*.storage.googleapis.com", "*.blob.core.windows.net",
)  # fmt: skip

#: Training-free dense heads for masks (see worker/model/dense.py); maskclip is the baseline.
DENSE_HEADS = ("clearclip", "naclip", "maskclip")
#: When masks are refined along the image's edges (PAMR): auto = those drawn with a project's
#: region prototypes (learnt from its corrected masks), which it lifts on the toy world, and not
#: training-free ones, which it hurts with ClearCLIP (docs/algorithms.md section 3).
PAMR_MODES = ("auto", "true", "false")
#: How scores become tags (see worker/model/selection.py): absolute thresholds, or TagCLIP's relative one.
TAG_RULES = ("absolute", "relative")
#: Where tag scores come from (see worker/model/tagclip.py): TagCLIP's local route, or the image's
#: global embedding, each label against the competitors alone.
TAG_SCORES = ("tagclip", "global")

#: Inference precision of the ViT: auto = bf16 where the hardware computes it natively.
PRECISIONS = ("auto", "bf16", "fp32")

#: What a project manager may set for one project, in the "Extra params" (JSON) of its model
#: connection in Label Studio, by the environment variable's name: how tags are decided and masks
#: drawn. Never paths, hosts, sizes or credentials: Label Studio's project admins are not operators.
PROJECT_SETTINGS = ("TAG_SCORES", "TAG_RULE", "TAG_MIN_SCORE", "TAG_THRESHOLD", "CWR_MAX_CLASSES",
                    "BACKGROUND_WORDS", "DENSE_HEAD", "DENSE_SLIDING", "DENSE_PAMR", "MASK_MIN_AREA")  # fmt: skip
#: Bounds on a project's BACKGROUND_WORDS (each word is embedded by the text tower once).
MAX_PROJECT_WORDS, MAX_WORD_LENGTH = 200, 60
#: A project's CWR_MAX_CLASSES when the environment sets no limit (0): each costs a ViT pass.
MAX_PROJECT_CWR_CLASSES = 16

#: Bumped when a change to the algorithms changes predictions for the same weights, so that
#: Label Studio re-predicts tasks that hold predictions from the old code.
ALGORITHM_REVISION = "4"


@dataclass(frozen=True)
class Settings:
    """Service configuration. Every field maps to the environment variable in its metadata."""

    # Request path
    redis_url: str | None = field(default=None, metadata={"env": "REDIS_URL"})
    basic_auth_user: str | None = field(default=None, metadata={"env": "BASIC_AUTH_USER"})
    basic_auth_pass: str | None = field(default=None, repr=False, metadata={"env": "BASIC_AUTH_PASS"})
    predict_timeout: float = field(default=80.0, metadata={"env": "PREDICT_TIMEOUT"})
    job_timeout: int = field(default=600, metadata={"env": "JOB_TIMEOUT"})
    result_ttl: int = field(default=3600, metadata={"env": "RESULT_TTL"})
    log_level: str = field(default="INFO", metadata={"env": "LOG_LEVEL"})
    max_tasks_per_job: int = field(default=8, metadata={"env": "MAX_TASKS_PER_JOB"})
    max_labels: int = field(default=1000, metadata={"env": "MAX_LABELS"})
    # Where gunicorn's processes share their Prometheus metrics (prelabel-backend sets it).
    prometheus_multiproc_dir: str | None = field(default=None, metadata={"env": "PROMETHEUS_MULTIPROC_DIR"})

    # Label Studio, for downloading task images
    label_studio_url: str | None = field(
        default=None, metadata={"env": "LABEL_STUDIO_URL", "aliases": ("LABEL_STUDIO_HOST",)}
    )
    label_studio_api_key: str | None = field(default=None, repr=False, metadata={
        "env": "LABEL_STUDIO_API_KEY", "aliases": ("LABEL_STUDIO_ACCESS_TOKEN",)})  # fmt: skip
    allowed_hosts: tuple[str, ...] = field(default=(), metadata={"env": "ALLOWED_HOSTS"})
    allow_internal_hosts: bool = field(default=False, metadata={"env": "ALLOW_INTERNAL_HOSTS"})
    storage_hosts: tuple[str, ...] = field(default=DEFAULT_STORAGE_HOSTS, metadata={"env": "STORAGE_HOSTS"})
    fetch_timeout: float = field(default=15.0, metadata={"env": "FETCH_TIMEOUT"})
    max_image_bytes: int = field(default=40 * 1024 * 1024, metadata={"env": "MAX_IMAGE_BYTES"})
    max_image_pixels: int = field(default=60_000_000, metadata={"env": "MAX_IMAGE_PIXELS"})
    fetch_threads: int = field(default=0, metadata={"env": "FETCH_THREADS"})  # 0: max(8, CPU cores)
    fetch_retries: int = field(default=2, metadata={"env": "FETCH_RETRIES"})
    # TLS for Label Studio and image hosts: an internal CA's bundle, or no check at all (tests only).
    verify_ssl: bool = field(default=True, metadata={"env": "VERIFY_SSL"})
    ca_bundle: str | None = field(default=None, metadata={"env": "REQUESTS_CA_BUNDLE", "aliases": ("SSL_CERT_FILE",)})

    # Model
    model_name: str = field(default="ViT-B-16-quickgelu", metadata={"env": "MODEL_NAME"})
    model_pretrained: str = field(default="openai", metadata={"env": "MODEL_PRETRAINED"})
    model_checkpoint: str | None = field(default=None, metadata={"env": "MODEL_CHECKPOINT"})
    model_dir: Path = field(default=Path("~/.cache/prelabel").expanduser(), metadata={"env": "MODEL_DIR"})
    model_version_override: str | None = field(default=None, metadata={"env": "MODEL_VERSION"})
    device: str = field(default="auto", metadata={"env": "DEVICE"})
    batch_size: int = field(default=8, metadata={"env": "BATCH_SIZE"})
    precision: str = field(default="auto", metadata={"env": "PRECISION"})

    # Algorithm
    image_size: int = field(default=448, metadata={"env": "IMAGE_SIZE"})
    tag_scores: str = field(default="tagclip", metadata={"env": "TAG_SCORES"})
    tag_rule: str = field(default="absolute", metadata={"env": "TAG_RULE"})
    tag_min_score: float = field(default=0.15, metadata={"env": "TAG_MIN_SCORE"})
    tag_threshold: float = field(default=0.5, metadata={"env": "TAG_THRESHOLD"})
    distractors: str = field(default="builtin", metadata={"env": "DISTRACTORS"})
    cwr_max_classes: int = field(default=6, metadata={"env": "CWR_MAX_CLASSES"})
    background_words: tuple[str, ...] = field(default=DEFAULT_BACKGROUND_WORDS, metadata={"env": "BACKGROUND_WORDS"})
    dense_head: str = field(default="clearclip", metadata={"env": "DENSE_HEAD"})
    dense_sliding: bool = field(default=True, metadata={"env": "DENSE_SLIDING"})
    dense_pamr: str = field(default="auto", metadata={"env": "DENSE_PAMR"})
    mask_min_area: float = field(default=0.002, metadata={"env": "MASK_MIN_AREA"})

    # Learning from corrections
    webhook_secret: str | None = field(default=None, repr=False, metadata={"env": "WEBHOOK_SECRET"})
    prelabel_url: str | None = field(default=None, metadata={"env": "PRELABEL_URL"})
    train_every: int = field(default=100, metadata={"env": "TRAIN_EVERY"})
    train_interval: int = field(default=0, metadata={"env": "TRAIN_INTERVAL"})
    train_timeout: int = field(default=4 * 3600, metadata={"env": "TRAIN_TIMEOUT"})
    train_min_corrections: int = field(default=10, metadata={"env": "TRAIN_MIN_CORRECTIONS"})
    train_max_corrections: int = field(default=2000, metadata={"env": "TRAIN_MAX_CORRECTIONS"})
    train_holdout: float = field(default=0.2, metadata={"env": "TRAIN_HOLDOUT"})
    train_steps: int = field(default=300, metadata={"env": "TRAIN_STEPS"})
    train_lr: float = field(default=1e-5, metadata={"env": "TRAIN_LR"})
    zegclip_min_masks: int = field(default=50, metadata={"env": "ZEGCLIP_MIN_MASKS"})
    zegclip_epochs: float = field(default=400.0, metadata={"env": "ZEGCLIP_EPOCHS"})
    zegclip_max_steps: int = field(default=20_000, metadata={"env": "ZEGCLIP_MAX_STEPS"})
    adapt_every: int = field(default=5, metadata={"env": "ADAPT_EVERY"})
    adapt_min_corrections: int = field(default=10, metadata={"env": "ADAPT_MIN_CORRECTIONS"})
    adapt_max_corrections: int = field(default=500, metadata={"env": "ADAPT_MAX_CORRECTIONS"})
    promotion_margin: float = field(default=0.0, metadata={"env": "PROMOTION_MARGIN"})

    def __post_init__(self) -> None:
        if not 0 < self.predict_timeout < 100:
            raise SettingsError(
                f"PREDICT_TIMEOUT={self.predict_timeout} must be between 0 and 100 seconds: "
                "Label Studio gives up on /predict after 100 s."
            )
        if not 0 <= self.tag_threshold < 1:
            raise SettingsError(f"TAG_THRESHOLD={self.tag_threshold} must be in [0, 1).")
        if self.tag_scores not in TAG_SCORES:
            raise SettingsError(f"TAG_SCORES={self.tag_scores} must be one of {', '.join(TAG_SCORES)}.")
        if self.tag_rule not in TAG_RULES:
            raise SettingsError(f"TAG_RULE={self.tag_rule} must be one of {', '.join(TAG_RULES)}.")
        if not 0 < self.tag_min_score < 1:
            raise SettingsError(f"TAG_MIN_SCORE={self.tag_min_score} must be a probability in (0, 1).")
        if self.image_size < 32:
            raise SettingsError(f"IMAGE_SIZE={self.image_size} is too small (at least 32 pixels).")
        if self.dense_head not in DENSE_HEADS:
            raise SettingsError(f"DENSE_HEAD={self.dense_head} must be one of {', '.join(DENSE_HEADS)}.")
        if self.dense_pamr not in PAMR_MODES:
            raise SettingsError(f"DENSE_PAMR={self.dense_pamr} must be one of {', '.join(PAMR_MODES)}.")
        if self.cwr_max_classes < 0:
            raise SettingsError(f"CWR_MAX_CLASSES={self.cwr_max_classes} must be 0 (no limit) or positive.")
        if self.precision not in PRECISIONS:
            raise SettingsError(f"PRECISION={self.precision} must be one of {', '.join(PRECISIONS)}.")
        if not 0 <= self.mask_min_area < 1:
            raise SettingsError(f"MASK_MIN_AREA={self.mask_min_area} must be a fraction of the image in [0, 1).")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise SettingsError("Set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither.")
        if not 0 < self.zegclip_epochs <= 1000:  # a NaN or an infinity too
            raise SettingsError(f"ZEGCLIP_EPOCHS={self.zegclip_epochs} must be a number of passes in (0, 1000].")
        if not 0 < self.train_holdout < 1:
            raise SettingsError(f"TRAIN_HOLDOUT={self.train_holdout} must be a fraction in (0, 1).")
        if self.fetch_threads < 0:
            raise SettingsError(f"FETCH_THREADS={self.fetch_threads} must be 0 (automatic) or positive.")
        if not 0 <= self.fetch_retries <= 10:
            raise SettingsError(f"FETCH_RETRIES={self.fetch_retries} must be between 0 (no retry) and 10.")
        if self.ca_bundle and not Path(self.ca_bundle).is_file():
            raise SettingsError(
                f"REQUESTS_CA_BUNDLE={self.ca_bundle} is not a file: give the PEM file of the CA certificates "
                "that sign Label Studio's and the image hosts' certificates."
            )
        if self.train_every < 0 or self.train_interval < 0 or self.adapt_every < 0:
            raise SettingsError("TRAIN_EVERY, TRAIN_INTERVAL and ADAPT_EVERY must be 0 (off) or positive.")
        positive = ("job_timeout", "result_ttl", "max_image_bytes", "max_image_pixels", "batch_size", "train_timeout",
                    "train_min_corrections", "train_max_corrections", "train_steps", "zegclip_min_masks",
                    "zegclip_epochs", "zegclip_max_steps", "max_tasks_per_job", "adapt_min_corrections",
                    "adapt_max_corrections", "max_labels")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name.upper()} must be a positive number.")
        for learner in ("train", "adapt"):
            least, most = getattr(self, f"{learner}_min_corrections"), getattr(self, f"{learner}_max_corrections")
            if least > most:
                name = learner.upper()
                raise SettingsError(f"{name}_MIN_CORRECTIONS={least} is over {name}_MAX_CORRECTIONS={most}: "
                                    "it would never run.")  # fmt: skip

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``); ``overrides`` win."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            # The name first, then the names other Label Studio ML backends use for it.
            for env in (f.metadata["env"], *f.metadata.get("aliases", ())):
                raw = environ.get(env)
                if raw is not None and raw.strip() != "":
                    values[f.name] = _parse(env, raw.strip(), f.default)
                    break
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in another process."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = ",".join(value)
            env[f.metadata["env"]] = str(value).lower() if isinstance(value, bool) else str(value)
        return env

    def project_overrides(self, extra_params: object) -> dict[str, object]:
        """The settings a project sets in Label Studio's ``extra_params``, checked as the
        environment's are: field name -> value ({} when it sets none).

        Raises:
            SettingsError: what is wrong, naming the setting, for Label Studio's connect dialog.
        """
        if extra_params is None or extra_params == {} or extra_params == "":
            return {}
        if not isinstance(extra_params, dict):
            raise SettingsError('Extra params must be a JSON object, such as {"TAG_MIN_SCORE": 0.2}.')
        by_env = {f.metadata["env"]: f for f in fields(self) if f.metadata["env"] in PROJECT_SETTINGS}
        overrides: dict[str, object] = {}
        for key, value in extra_params.items():
            f = by_env.get(str(key).upper())
            if f is None:
                raise SettingsError(
                    f"Extra params: {str(key)[:60]!r} is not a per-project setting; these are: "
                    f"{', '.join(PROJECT_SETTINGS)}."
                )
            env = f.metadata["env"]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                value = ",".join(value)
            if isinstance(value, bool):
                value = str(value).lower()
            if not isinstance(value, str | int | float):
                raise SettingsError(f"Extra params: {env} must be a number, true/false, a string or a list of words.")
            overrides[f.name] = _parse(env, str(value).strip(), f.default)
        cwr = overrides.get("cwr_max_classes")
        ceiling = self.cwr_max_classes or MAX_PROJECT_CWR_CLASSES  # each class costs a ViT pass per image
        if cwr is not None and not 1 <= cwr <= ceiling:  # type: ignore[operator]
            raise SettingsError(f"Extra params: CWR_MAX_CLASSES must be between 1 and {ceiling} (the service's limit).")
        words = overrides.get("background_words", ())
        if len(words) > MAX_PROJECT_WORDS or any(len(w) > MAX_WORD_LENGTH for w in words):  # type: ignore[arg-type]
            raise SettingsError(
                f"Extra params: BACKGROUND_WORDS takes at most {MAX_PROJECT_WORDS} words of at most "
                f"{MAX_WORD_LENGTH} characters."
            )
        replace(self, **overrides)  # the checks the environment's values go through
        return overrides

    @property
    def embedded(self) -> bool:
        """Without Redis, jobs run inside the backend process (a laptop demo, one command)."""
        return not self.redis_url

    @property
    def auth_enabled(self) -> bool:
        return bool(self.basic_auth_user)

    @property
    def kept_ttl(self) -> int:
        """Seconds a failed predict job, a bulk request's record and a late job's delivery are kept
        (24 x RESULT_TTL): long enough to see why a job failed, and to deliver one whose backend
        process died, after its result itself (RESULT_TTL) would be gone."""
        return self.result_ttl * 24

    @property
    def random_weights(self) -> bool:
        return self.model_checkpoint is None and self.model_pretrained == "random"

    @property
    def model_version(self) -> str:
        """The version string /setup reports and every prediction carries.

        It names the weights and hashes the settings that change predictions, so that changing
        either makes Label Studio re-predict, and nothing else does.
        """
        if self.model_version_override:
            return self.model_version_override
        if self.model_checkpoint:
            weights = Path(self.model_checkpoint).name or "checkpoint"
        else:
            weights = f"{self.model_name}.{self.model_pretrained}"
        knobs = {
            "algorithm": ALGORITHM_REVISION,
            "image_size": self.image_size,
            "tag_rule": self.tag_rule,
            "tag_min_score": self.tag_min_score,
            "tag_threshold": self.tag_threshold,
            "distractors": self.distractors,
            "background_words": list(self.background_words),
            "dense_head": self.dense_head,
            "dense_sliding": self.dense_sliding,
            "mask_min_area": self.mask_min_area,
            # only when always on: versions from before the option stay the same, and nothing
            # re-predicts; auto draws a base version's masks as false does (only versions fitted on
            # a project's corrected masks are refined, and those are versions of their own)
            **({"dense_pamr": True} if self.dense_pamr == "true" else {}),
            # CWR runs on TagCLIP's route only
            **(
                {"cwr_max_classes": self.cwr_max_classes}
                if self.tag_scores == "tagclip"
                else {"tag_scores": self.tag_scores}
            ),
        }
        digest = hashlib.sha1(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:6]
        return f"prelabel-{weights}-{digest}"


def project_version(version: str, project_settings: Mapping[str, object]) -> str:
    """The version Label Studio sees for a project with settings of its own (``<version>~<digest>``):
    changing them makes Label Studio predict the project's tasks again, and nothing else does."""
    if not project_settings:
        return version
    digest = hashlib.sha1(json.dumps(project_settings, sort_keys=True).encode()).hexdigest()[:6]
    return f"{version}~{digest}"


def _parse(env: str, raw: str, default: object) -> object:
    """Convert ``raw`` to the type of ``default``, with an error that names the variable."""
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            return tuple(item.strip() for item in raw.split(",") if item.strip())
        if isinstance(default, Path):
            return Path(raw).expanduser()
        return raw
    except ValueError as e:
        kind = type(default).__name__ if default is not None else "str"
        raise SettingsError(f"{env}={raw!r} is not a valid {kind}: {e}") from e
