"""The CPU rollout server of the ``fit()`` test (tests/verl/cpu_fit/rollout.py), without Ray:
seeded sampling, log-probs of the model that holds the weights, weight loading by name."""

from types import SimpleNamespace

import pytest
import torch

from tests.verl.cpu_fit.rollout import HFServer
from tests.verl.helpers import tiny_qwen3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ta_opd.tools.toy.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("rollout_model")
    tiny_qwen3(path, seed=3)
    build_tokenizer().save_pretrained(path)
    return HFServer(SimpleNamespace(response_length=6, seed=42), str(path), replica_rank=0)


PARAMS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True}


def test_samples_depend_on_request_id_and_weights_version_only(server):
    a = server.generate("det-0", [5, 6, 7], dict(PARAMS))
    assert server.generate("det-0", [5, 6, 7], dict(PARAMS)).token_ids == a.token_ids  # reproducible
    others = [server.generate(f"det-{i}", [5, 6, 7], dict(PARAMS)).token_ids for i in range(1, 6)]
    assert any(o != a.token_ids for o in others)  # the G samples of one prompt differ
    assert 1 <= len(a.token_ids) <= 6 and a.extra_fields["global_steps"] == server.version


def test_log_probs_are_the_models_and_weights_load_by_name(server):
    out = server.generate("det-7", [9, 10], dict(PARAMS))
    ids = torch.tensor([[9, 10, *out.token_ids]])
    logp = torch.log_softmax(server.model(input_ids=ids).logits[0, 1:-1].float(), -1)
    want = logp.gather(-1, ids[0, 2:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(out.log_probs), want, atol=1e-5, rtol=0)
    original = {k: v.clone() for k, v in server.model.state_dict().items()}
    server.load_weights({k: torch.zeros_like(v) for k, v in original.items()}, global_steps=5)
    assert server.version == 5
    assert all(float(p.abs().sum()) == 0 for p in server.model.parameters())
    with pytest.raises(KeyError, match="unknown"):
        server.load_weights({**original, "extra.weight": torch.zeros(1)}, global_steps=6)
    server.load_weights(original, global_steps=6)
    assert server.generate("det-7", [9, 10], dict(PARAMS)).log_probs != out.log_probs  # another version: new seed
