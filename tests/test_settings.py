from pathlib import Path

import pytest

from common.errors import SettingsError
from common.settings import DEFAULT_BACKGROUND_WORDS, Settings


def test_defaults_without_environment():
    settings = Settings.from_env({})
    assert settings.embedded
    assert not settings.auth_enabled
    assert settings.model_name == "ViT-B-16-quickgelu" and settings.model_pretrained == "openai"
    assert settings.background_words == DEFAULT_BACKGROUND_WORDS
    assert settings.predict_timeout < 100  # below Label Studio's /predict timeout


def test_environment_names_and_types():
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://localhost:6379/3",
            "LABEL_STUDIO_URL": "http://ls:8080",
            "LABEL_STUDIO_API_KEY": "secret-token",
            "BASIC_AUTH_USER": "ls",
            "BASIC_AUTH_PASS": "pw",
            "MODEL_DIR": "/models",
            "PREDICT_TIMEOUT": "30",
            "ALLOWED_HOSTS": "images.example.com, *.cdn.example.com",
            "ALLOW_INTERNAL_HOSTS": "true",
            "TAG_THRESHOLD": "0.4",
            "BACKGROUND_WORDS": "sky,grass",
        }
    )
    assert not settings.embedded and settings.auth_enabled
    assert settings.model_dir == Path("/models")
    assert settings.predict_timeout == 30.0
    assert settings.allowed_hosts == ("images.example.com", "*.cdn.example.com")
    assert settings.allow_internal_hosts is True
    assert settings.background_words == ("sky", "grass")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PREDICT_TIMEOUT": "abc"}, "PREDICT_TIMEOUT='abc' is not a valid float"),
        ({"PREDICT_TIMEOUT": "120"}, "Label Studio gives up"),
        ({"ALLOW_INTERNAL_HOSTS": "maybe"}, "expected true or false"),
        ({"BASIC_AUTH_USER": "only-user"}, "Set both BASIC_AUTH_USER and BASIC_AUTH_PASS"),
        ({"TAG_THRESHOLD": "1.5"}, "TAG_THRESHOLD"),
        ({"BATCH_SIZE": "0"}, "BATCH_SIZE must be a positive number"),
        ({"PRECISION": "fp16"}, "PRECISION=fp16 must be one of auto, bf16, fp32"),
        ({"TAG_SCORES": "patch"}, "TAG_SCORES=patch must be one of tagclip, global"),
        ({"CWR_MAX_CLASSES": "-1"}, "CWR_MAX_CLASSES"),
        ({"FETCH_THREADS": "-2"}, r"FETCH_THREADS=-2 must be 0 \(automatic\) or positive"),
        ({"MAX_TASKS_PER_JOB": "0"}, "MAX_TASKS_PER_JOB must be a positive number"),
        ({"MAX_LABELS": "-5"}, "MAX_LABELS must be a positive number"),
        ({"TRAIN_MIN_CORRECTIONS": "3000"}, "TRAIN_MIN_CORRECTIONS=3000 is over TRAIN_MAX_CORRECTIONS=2000"),
        ({"ADAPT_MAX_CORRECTIONS": "5"}, "ADAPT_MIN_CORRECTIONS=10 is over ADAPT_MAX_CORRECTIONS=5"),
        ({"FETCH_RETRIES": "50"}, "FETCH_RETRIES=50 must be between 0"),
        ({"REQUESTS_CA_BUNDLE": "/nonexistent/ca.pem"}, "REQUESTS_CA_BUNDLE=/nonexistent/ca.pem is not a file"),
        ({"VERIFY_SSL": "perhaps"}, "VERIFY_SSL='perhaps' is not a valid bool"),
    ],
)
def test_invalid_values_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_secrets_stay_out_of_repr():
    env = {"LABEL_STUDIO_API_KEY": "tok-123", "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "pw-456"}
    settings = Settings.from_env(env)
    assert "tok-123" not in repr(settings) and "pw-456" not in repr(settings)


def test_model_version_tracks_weights_and_prediction_settings():
    base = Settings.from_env({})
    assert base.model_version.startswith("prelabel-ViT-B-16-quickgelu.openai-")
    assert Settings.from_env({}).model_version == base.model_version  # stable across processes
    assert Settings.from_env({"TAG_THRESHOLD": "0.3"}).model_version != base.model_version
    assert Settings.from_env({"IMAGE_SIZE": "224"}).model_version != base.model_version
    assert Settings.from_env({"CWR_MAX_CLASSES": "0"}).model_version != base.model_version
    assert Settings.from_env({"DENSE_PAMR": "true"}).model_version != base.model_version
    # auto (the default) draws a base version's masks as false does: the same version
    assert Settings.from_env({"DENSE_PAMR": "false"}).model_version == base.model_version
    assert Settings.from_env({"TAG_SCORES": "global"}).model_version != base.model_version
    assert Settings.from_env({"TAG_SCORES": "tagclip"}).model_version == base.model_version  # the default
    on_global = Settings.from_env({"TAG_SCORES": "global"}).model_version
    assert Settings.from_env({"TAG_SCORES": "global", "CWR_MAX_CLASSES": "2"}).model_version == on_global  # no CWR
    assert Settings.from_env({"PREDICT_TIMEOUT": "50"}).model_version == base.model_version  # not a model knob
    assert Settings.from_env({"PRECISION": "fp32"}).model_version == base.model_version  # numerics, like DEVICE
    assert "random" in Settings.from_env({"MODEL_PRETRAINED": "random"}).model_version
    assert Settings.from_env({"MODEL_CHECKPOINT": "/m/toy-clip"}).model_version.startswith("prelabel-toy-clip-")
    assert Settings.from_env({"MODEL_VERSION": "v7"}).model_version == "v7"


def test_debug_logging_keeps_urllib3_s_request_lines_out():
    """urllib3's debug lines quote request paths with their query (presigned signatures)."""
    import logging

    from common.logs import configure_logging

    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        configure_logging("DEBUG")
        assert root.level == logging.DEBUG
        assert logging.getLogger("urllib3").getEffectiveLevel() == logging.INFO
        assert logging.getLogger("urllib3.connectionpool").getEffectiveLevel() == logging.INFO
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
        logging.getLogger("urllib3").setLevel(logging.NOTSET)


def test_the_names_other_label_studio_backends_use_are_read_too():
    aliased = Settings.from_env({"LABEL_STUDIO_HOST": "http://ls:8080", "LABEL_STUDIO_ACCESS_TOKEN": "abc"})
    assert (aliased.label_studio_url, aliased.label_studio_api_key) == ("http://ls:8080", "abc")
    both = Settings.from_env({"LABEL_STUDIO_URL": "http://ours:8080", "LABEL_STUDIO_HOST": "http://ls:8080"})
    assert both.label_studio_url == "http://ours:8080"  # prelabel's own name wins


def test_tls_settings_use_the_names_requests_and_openssl_read(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert Settings.from_env({"REQUESTS_CA_BUNDLE": str(bundle)}).ca_bundle == str(bundle)
    assert Settings.from_env({"SSL_CERT_FILE": str(bundle)}).ca_bundle == str(bundle)
    assert Settings.from_env({}).verify_ssl and not Settings.from_env({"VERIFY_SSL": "false"}).verify_ssl


def test_per_project_settings_are_named_as_in_the_environment():
    from dataclasses import fields

    from common.settings import PROJECT_SETTINGS

    envs = {f.metadata["env"]: f.name for f in fields(Settings)}
    assert all(envs[name] == name.lower() for name in PROJECT_SETTINGS)  # extra_params keys are env names
    settings = Settings.from_env({})
    assert settings.project_overrides(
        {"tag_rule": "relative", "BACKGROUND_WORDS": ["sky", " floor "], "DENSE_SLIDING": False, "TAG_SCORES": "global"}
    ) == {  # fmt: skip
        "tag_rule": "relative",
        "tag_scores": "global",
        "background_words": ("sky", "floor"),
        "dense_sliding": False,
    }
    assert settings.project_overrides(None) == settings.project_overrides({}) == {}


def test_dense_pamr_is_auto_true_or_false_and_a_project_may_set_it():
    assert Settings.from_env({}).dense_pamr == "auto"
    assert Settings.from_env({"DENSE_PAMR": "true"}).dense_pamr == "true"
    with pytest.raises(SettingsError, match="DENSE_PAMR=yes must be one of auto, true, false"):
        Settings.from_env({"DENSE_PAMR": "yes"})
    assert Settings().project_overrides({"DENSE_PAMR": False}) == {"dense_pamr": "false"}  # JSON's false
    assert Settings().project_overrides({"dense_pamr": "true"}) == {"dense_pamr": "true"}
