"""The transformers engine against the plain model: incremental decode, rollback by KV crop,
activations, hooks removed, sampling parameters."""

from __future__ import annotations

import pytest
import torch

from guard.errors import ContextLengthError, InvalidRequestError
from guard.sampling import SamplingParams, check_token_ids, make_generator, sample


def _prompt(engine, text="Hello there"):
    return engine.tokenizer.encode_chat([{"role": "user", "content": text}])


def _generate(engine, seq, params, n):
    gen = make_generator(params.seed)
    return [engine.step(seq, params, gen) for _ in range(n)]


def test_incremental_decode_matches_full_forward(tiny_engine):
    eng = tiny_engine
    seq = eng.new_sequence(_prompt(eng), layers=[0, 1])
    eng.prefill(seq)
    outs = _generate(eng, seq, SamplingParams(seed=1), 12)
    assert outs[0].n_fed == 0 and all(o.n_fed == 1 for o in outs[1:])
    full = eng.hidden_states(seq.tokens, [0, 1])
    for o in outs[1:]:
        for layer in (0, 1):
            torch.testing.assert_close(
                o.hidden[layer][0], full[layer][o.fed_start], atol=1e-4, rtol=1e-4
            )


def test_rollback_crops_cache_and_never_reruns_prompt(tiny_engine):
    eng = tiny_engine
    prompt = _prompt(eng, "Rollback test prompt")
    seq = eng.new_sequence(prompt, layers=[1])
    before = eng.stats.prompt_tokens
    eng.prefill(seq)
    _generate(eng, seq, SamplingParams(seed=2), 10)
    refed = eng.stats.refed_tokens
    eng.rollback(seq, seq.prompt_len + 4)
    assert seq.output_ids and len(seq.output_ids) == 4
    out = eng.step(seq, SamplingParams(seed=3), make_generator(3))
    assert eng.stats.refed_tokens == refed + 1 and out.n_fed == 1  # token 3 of the output is re-fed
    # the KV cache after the crop gives the same activations as a fresh full forward
    full = eng.hidden_states(seq.tokens, [1])[1]
    torch.testing.assert_close(out.hidden[1][0], full[seq.prompt_len + 3], atol=1e-4, rtol=1e-4)
    # back to the response start: the prefill logits are reused, nothing is re-fed
    eng.rollback(seq, seq.prompt_len)
    out = eng.step(seq, SamplingParams(seed=4), make_generator(4))
    assert out.n_fed == 0
    assert eng.stats.prompt_tokens - before == len(prompt)  # the prompt ran exactly once


def test_same_seed_after_rollback_reproduces_tokens(tiny_engine):
    eng = tiny_engine
    seq = eng.new_sequence(_prompt(eng), layers=[])
    eng.prefill(seq)
    params = SamplingParams(seed=7)
    first = [o.token_id for o in _generate(eng, seq, params, 8)]
    eng.rollback(seq, seq.prompt_len)
    again = [o.token_id for o in _generate(eng, seq, params, 8)]
    assert first == again


def test_hooks_are_removed(tiny_engine):
    eng = tiny_engine
    seq = eng.new_sequence(_prompt(eng), layers=[0, 1])
    eng.prefill(seq, return_hidden=True)
    _generate(eng, seq, SamplingParams(seed=1), 3)
    assert all(len(layer._forward_hooks) == 0 for layer in eng.layers)


def test_steering_changes_downstream_but_capture_reads_the_unsteered_layer(tiny_engine):
    eng = tiny_engine
    seq = eng.new_sequence(_prompt(eng), layers=[0, 1])
    eng.prefill(seq)
    _generate(eng, seq, SamplingParams(seed=1), 2)
    eng.rollback(seq, seq.prompt_len + 1)
    vec = torch.ones(eng.info.d_model)
    steered = eng.step(seq, SamplingParams(seed=1), make_generator(1), steer={0: vec}, sample=False)
    plain = eng.hidden_states(seq.tokens, [0, 1])
    # the monitored layer is read before the intervention; the next layer sees its effect
    torch.testing.assert_close(steered.hidden[0][0], plain[0][-1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(steered.hidden[1][0], plain[1][-1], atol=1e-3)


def test_prompt_too_long_is_a_context_error(tiny_engine):
    with pytest.raises(ContextLengthError):
        tiny_engine.new_sequence(list(range(10)) * 100)


def test_sampling_parameters():
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0])
    gen = make_generator(0)
    assert sample(logits, SamplingParams(temperature=0), gen) == 1
    assert sample(logits, SamplingParams(temperature=0, banned_token_ids=frozenset({1})), gen) == 2
    assert sample(logits, SamplingParams(temperature=0, logit_bias={3: 10.0}), gen) == 3
    assert sample(logits, SamplingParams(temperature=0), gen, extra_banned=frozenset({1, 2})) == 0
    draws = {sample(logits, SamplingParams(top_k=1, seed=0), gen) for _ in range(20)}
    assert draws == {1}
    draws = {sample(logits, SamplingParams(top_p=0.5), gen) for _ in range(20)}
    assert draws == {1}
    a = [sample(logits, SamplingParams(), make_generator(5)) for _ in range(5)]
    b = [sample(logits, SamplingParams(), make_generator(5)) for _ in range(5)]
    assert a == b


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ("a", "b", "c", "d", "e")}, "stop"),
        ({"logit_bias": {1: 200.0}}, "logit_bias"),
    ],
)
def test_bad_sampling_values_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param


def test_token_ids_outside_vocab_are_rejected():
    with pytest.raises(InvalidRequestError) as err:
        check_token_ids(SamplingParams(stop_token_ids=(10_000,)), vocab_size=100)
    assert err.value.param == "stop_token_ids"
