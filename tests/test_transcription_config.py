"""transcription_engine_config is checked against the SDK's config type for the chosen engine."""

from __future__ import annotations

from typing import Literal, TypedDict

import pytest
from django.core import checks
from django.core.management.base import CommandError

from callops import actions
from callops.checks import transcription_engines
from callops.management.commands import telnyx_spec as generator
from callops.telnyx_params import DEFAULT_TRANSCRIPTION_ENGINE, ParamsInvalid
from callops.telnyx_spec import (
    PARAMETERS,
    TRANSCRIPTION_CONFIG_REQUIRED,
    TRANSCRIPTION_CONFIG_SELECTOR,
    TRANSCRIPTION_CONFIGS,
    TRANSCRIPTION_ENGINES,
)
from tests.helpers import make_call, partner_with_key

CONFIG = "transcription_engine_config"
# Inside a config these only say which engine (or Deepgram model) it is for.
DISCRIMINATORS = {"transcription_engine", *TRANSCRIPTION_CONFIG_SELECTOR.values()}
EACH_CONFIG_TYPE = [(engine, t) for engine, types in TRANSCRIPTION_ENGINES.items() for t in types]


def start(engine: str | None = None, config: dict | None = None) -> dict:
    params = {"transcription_engine": engine, CONFIG: config}
    return actions.validate("transcription_start", params)


def refused(engine: str | None = None, config: dict | None = None) -> dict[str, str]:
    with pytest.raises(ParamsInvalid) as refusal:
        start(engine, config)
    return {field: " ".join(messages) for field, messages in refusal.value.errors.items()}


def sample(kind: object) -> object:
    """A value the SDK's description ``kind`` allows."""
    if isinstance(kind, tuple):
        return kind[0]
    scalars = {"bool": True, "int": 1, "float": 1.5, "str": "x"}
    if kind in scalars:
        return scalars[kind]
    if kind.startswith("list["):
        return [sample(kind[5:-1])]
    if kind.startswith("dict[str, "):
        return {"word": sample(kind[10:-1])}
    return minimal(kind)


def minimal(config_type: str) -> dict:
    fields = TRANSCRIPTION_CONFIGS[config_type]
    return {key: sample(fields[key]) for key in TRANSCRIPTION_CONFIG_REQUIRED[config_type]}


# --- Azure --------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [None, {}, {"language": "de"}])
def test_it_refuses_azure_without_a_region(config):
    errors = refused("Azure", config)
    assert "Azure needs a region" in errors[CONFIG]
    assert "westeurope" in errors[CONFIG]  # and says which regions there are


def test_it_refuses_a_region_azure_does_not_have_naming_the_field():
    errors = refused("Azure", {"region": "mars-north"})
    assert list(errors) == [f"{CONFIG}.region"]
    assert "eastus" in errors[f"{CONFIG}.region"]


def test_it_accepts_a_valid_azure_config_as_it_is():
    config = {
        "region": "westeurope",
        "language": "de",
        "api_key_ref": "my-azure-key",
        "transcription_engine": "Azure",
    }
    assert start("Azure", config) == {"transcription_engine": "Azure", CONFIG: config}


def test_it_refuses_a_language_azure_does_not_list():
    assert f"{CONFIG}.language" in refused("Azure", {"region": "eastus", "language": "klingon"})


# --- Deepgram -----------------------------------------------------------------------------


def test_it_refuses_a_deepgram_model_the_sdk_does_not_list():
    errors = refused("Deepgram", {"transcription_model": "deepgram/flux"})
    assert list(errors) == [f"{CONFIG}.transcription_model"]
    assert "deepgram/nova-3" in errors[f"{CONFIG}.transcription_model"]


def test_a_deepgram_config_must_say_its_model():
    errors = refused("Deepgram", {"language": "en-US"})
    assert "Deepgram needs a transcription_model" in errors[CONFIG]


def test_deepgram_without_a_config_takes_telnyxs_defaults():
    assert start("Deepgram") == {"transcription_engine": "Deepgram"}


def test_each_deepgram_model_has_its_own_settings():
    nova3 = {"transcription_model": "deepgram/nova-3", "keyterms": ["callops"]}
    assert start("Deepgram", nova3)[CONFIG] == nova3
    errors = refused("Deepgram", {**nova3, "transcription_model": "deepgram/nova-2"})
    assert errors == {f"{CONFIG}.keyterms": "is not a setting of Deepgram deepgram/nova-2"}


def test_it_refuses_a_deepgram_language_the_model_does_not_have():
    # "bg" is a Nova-2 language, not a Nova-3 one.
    assert start("Deepgram", {"transcription_model": "deepgram/nova-2", "language": "bg"})
    errors = refused("Deepgram", {"transcription_model": "deepgram/nova-3", "language": "bg"})
    assert list(errors) == [f"{CONFIG}.language"]


# --- Any engine ---------------------------------------------------------------------------


def test_it_refuses_an_unknown_setting_naming_it():
    errors = refused("Azure", {"region": "eastus", "foo": 1})
    assert errors == {f"{CONFIG}.foo": "is not a setting of Azure"}


@pytest.mark.parametrize(
    ("engine", "config"),
    [
        ("Azure", {"region": "eastus", "transcription_engine": "Google"}),
        ("Telnyx", {"transcription_engine": "B"}),  # B is Telnyx's legacy name, with its own type
        (
            "Deepgram",
            {"transcription_model": "deepgram/nova-3", "transcription_engine": "deepgram/nova-2"},
        ),
    ],
)
def test_it_refuses_a_config_for_another_engine_than_transcription_engine(engine, config):
    errors = refused(engine, config)
    assert "to agree with transcription_engine" in errors[f"{CONFIG}.transcription_engine"]


@pytest.mark.parametrize(
    ("config", "field", "message"),
    [
        ({"interim_results": "yes"}, "interim_results", "must be true or false"),
        ({"max_speaker_count": True}, "max_speaker_count", "must be a whole number"),
        ({"max_speaker_count": 2.5}, "max_speaker_count", "must be a whole number"),
        ({"hints": "callops"}, "hints", "must be a list"),
        ({"hints": ["ok", 7]}, "hints[1]", "must be a string"),
        ({"speech_context": [{"boost": "high"}]}, "speech_context[0].boost", "must be a number"),
        ({"speech_context": [{"phrase": ["x"]}]}, "speech_context[0].phrase", "not a setting"),
        ({"speech_context": ["x"]}, "speech_context[0]", "must be an object"),
    ],
)
def test_it_refuses_a_value_of_the_wrong_type_naming_where(config, field, message):
    errors = refused("Google", config)
    assert list(errors) == [f"{CONFIG}.{field}"]
    assert message in errors[f"{CONFIG}.{field}"]


def test_a_number_may_be_whole_and_a_boost_map_holds_numbers():
    config = {"transcription_model": "deepgram/nova-2", "keywords_boosting": {"a": 5, "b": 0.5}}
    assert start("Deepgram", config)[CONFIG] == config
    config["keywords_boosting"]["c"] = "lots"
    assert list(refused("Deepgram", config)) == [f"{CONFIG}.keywords_boosting.c"]


def test_without_transcription_engine_the_config_is_checked_as_the_default_engines():
    assert DEFAULT_TRANSCRIPTION_ENGINE == "Google"
    google = {"model": "phone_call", "language": "en", "interim_results": False}
    assert start(config=google) == {CONFIG: google}
    errors = refused(config={"region": "eastus"})
    assert errors == {f"{CONFIG}.region": "is not a setting of Google (Telnyx's default engine)"}
    errors = refused(config={"transcription_engine": "Azure", "region": "eastus"})
    assert "give transcription_engine" in errors[f"{CONFIG}.transcription_engine"]


# --- Every engine the SDK lists -------------------------------------------------------------


def test_the_table_places_a_config_type_for_every_engine_the_sdk_lists():
    assert tuple(TRANSCRIPTION_ENGINES) == PARAMETERS["transcription_start"]["transcription_engine"]
    assert set(TRANSCRIPTION_ENGINES["Deepgram"]) == {
        "DeepgramNova2ConfigParam",
        "DeepgramNova3ConfigParam",
    }
    assert TRANSCRIPTION_CONFIGS["TranscriptionEngineAzureConfigParam"]["transcription_engine"] == (
        "Azure",
    )


@pytest.mark.parametrize(("engine", "config_type"), EACH_CONFIG_TYPE)
def test_each_engines_minimal_config_is_accepted(engine, config_type):
    config = minimal(config_type)
    assert start(engine, config) == {"transcription_engine": engine, CONFIG: config}
    # transcription_engine inside the config only restates the call's own: it may be left out.
    without = {k: v for k, v in config.items() if k != "transcription_engine"}
    assert start(engine, without or None)


@pytest.mark.parametrize(("engine", "config_type"), EACH_CONFIG_TYPE)
def test_every_setting_of_every_engine_is_accepted(engine, config_type):
    fields = TRANSCRIPTION_CONFIGS[config_type]
    config = {key: sample(kind) for key, kind in fields.items()}
    assert start(engine, config)[CONFIG] == config


@pytest.mark.parametrize(("engine", "config_type"), EACH_CONFIG_TYPE)
def test_every_setting_of_every_engine_refuses_a_wrong_value_naming_it(engine, config_type):
    for key in TRANSCRIPTION_CONFIGS[config_type]:
        config = {**minimal(config_type), key: [[]]}  # of no type any setting has
        errors = refused(engine, config)
        assert any(field.startswith(f"{CONFIG}.{key}") for field in errors), (key, errors)


@pytest.mark.parametrize("engine", list(TRANSCRIPTION_ENGINES))
def test_an_engine_goes_without_a_config_unless_it_requires_a_setting(engine):
    needs = set.intersection(
        *(set(TRANSCRIPTION_CONFIG_REQUIRED[t]) for t in TRANSCRIPTION_ENGINES[engine])
    )
    if needs - DISCRIMINATORS:
        assert CONFIG in refused(engine)
    else:
        assert start(engine) == {"transcription_engine": engine}
    assert (engine == "Azure") == bool(needs - DISCRIMINATORS)  # the only one today


# --- The generator and the operator's setting -----------------------------------------------


def test_the_generator_refuses_a_config_type_it_cannot_place():
    class WhisperConfigParam(TypedDict, total=False):
        transcription_engine: Literal["whisper/large"]

    with pytest.raises(CommandError, match="cannot tell which transcription_engine"):
        generator._engine_of(WhisperConfigParam, ("Google", "Azure"))


def test_the_default_setting_allows_every_engine_the_sdk_lists(settings):
    assert list(settings.TELNYX_TRANSCRIPTION_ENGINES) == list(TRANSCRIPTION_ENGINES)
    assert not [m for m in transcription_engines(None) if m.id == "callops.W003"]


def test_an_engine_the_sdk_does_not_list_is_warned_of_and_refused(settings):
    settings.TELNYX_TRANSCRIPTION_ENGINES = ["Google", "Whisper"]
    (warning,) = transcription_engines(None)
    assert warning.id == "callops.W003" and warning.level == checks.WARNING
    assert "Whisper" in warning.msg and "Google" not in warning.msg
    assert "transcription_engine" in refused("Whisper")


# --- Through the partner API ----------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.usefixtures("fake_dns")
def test_the_api_answers_400_naming_the_setting_and_202_for_a_good_config():
    _, client = partner_with_key("alice", "conn-alice")
    make_call("v3:alice-1", "conn-alice")
    url = "/api/v1/calls/v3:alice-1/transcription/"
    body = {"transcription_engine": "Azure", CONFIG: {"region": "mars-north", "foo": True}}
    response = client.post(url, body, format="json")
    assert response.status_code == 400
    assert {e["field"] for e in response.json()["errors"]} == {f"{CONFIG}.region", f"{CONFIG}.foo"}
    body[CONFIG] = {"region": "eastus"}
    assert client.post(url, body, format="json").status_code == 202


@pytest.mark.django_db
@pytest.mark.usefixtures("fake_dns")
def test_a_profile_with_a_bad_engine_config_answers_400_naming_the_setting():
    _, client = partner_with_key("alice", "conn-alice")
    body = {
        "stream_url": "wss://media.example.com/audio",
        "transcribe": True,
        "transcription_engine": "Deepgram",
        CONFIG: {"transcription_model": "deepgram/flux"},
    }
    response = client.post("/api/v1/profiles/", body, format="json")
    assert response.status_code == 400
    assert [e["field"] for e in response.json()["errors"]] == [f"{CONFIG}.transcription_model"]
