"""The action table against the installed SDK: names, methods, parameters and enums agree."""

from __future__ import annotations

import pytest
import telnyx
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError

from callops import actions
from callops.management.commands import telnyx_spec
from callops.telnyx_params import ParamsInvalid
from callops.telnyx_spec import PARAMETERS

NOT_PARAMETERS = {"client_state", "command_id"}  # set by the outbox, not by the caller


def test_the_generated_parameter_table_matches_the_installed_sdk():
    call_command("telnyx_spec", "--check")


def test_a_stale_parameter_table_is_refused(tmp_path, monkeypatch):
    stale = tmp_path / "telnyx_spec.py"
    stale.write_text(telnyx_spec.TARGET.read_text().replace('"stream_url": "str"', ""))
    monkeypatch.setattr(telnyx_spec, "TARGET", stale)
    with pytest.raises(CommandError, match="differs from the installed SDK"):
        call_command("telnyx_spec", "--check")


@pytest.mark.parametrize("action", list(actions.ACTIONS.values()), ids=lambda a: a.name)
def test_every_action_names_a_method_of_the_sdk(action):
    client = telnyx.Telnyx(api_key="KEY_TEST", base_url="http://127.0.0.1:9/v2")
    resource = client.calls.actions if action.on_call else client.calls
    assert callable(getattr(resource, action.sdk_method))
    assert action.name in PARAMETERS


@pytest.mark.parametrize("action", list(actions.ACTIONS.values()), ids=lambda a: a.name)
def test_every_parameter_and_enum_is_the_sdks(action):
    sdk = PARAMETERS[action.name]
    extra = actions.NOT_IN_SDK.get(action.name, set())
    assert set(action.rules) - extra <= set(sdk)
    for name, rule in action.rules.items():
        if isinstance(sdk.get(name), tuple):
            # An operator may narrow the engines (TELNYX_TRANSCRIPTION_ENGINES), never widen them.
            choices = getattr(rule, "choices", None) or settings.TELNYX_TRANSCRIPTION_ENGINES
            assert set(choices) <= set(sdk[name]), name
            assert rule.__name__ == "transcription_engine" or tuple(choices) == sdk[name]


@pytest.mark.parametrize("action", list(actions.ACTIONS.values()), ids=lambda a: a.name)
def test_an_sdk_parameter_the_table_does_not_handle_is_refused_not_dropped(action):
    unhandled = set(PARAMETERS[action.name]) - set(action.rules) - NOT_PARAMETERS
    for name in unhandled:
        with pytest.raises(ParamsInvalid) as refused:
            actions.validate(action.name, {name: "x"})
        assert name in refused.value.errors


def test_each_start_has_a_stop_that_targets_the_same_record():
    for action in actions.ACTIONS.values():
        if action.starts:
            stop = actions.get(action.stop)
            assert stop.is_stop and stop.record == action.record
            assert actions.STOPS[action.record] is stop
