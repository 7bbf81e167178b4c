"""The runner's rotary table (LlamaRunner._cos_sin): for the rope types whose cos/sin depend on the position alone,
rows of a table the model's own rotary module computed once, bit for bit what that module returns for the same
positions, one at a time or batched; longrope (its frequencies switch with the call's longest position) keeps the
module. On the bundled target and the tiny families (Llama-3.1's llama3 scaling, Qwen2.5, Qwen3, Mistral, Llama
with biases), plus linear and yarn scaling."""

from __future__ import annotations

import pytest
import torch
from tiny_families import FAMILIES, build, load

from specfleet.engine.llama import LlamaRunner, causal_bias

EXTRA = {
    "llama-linear": ("llama-biases", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                           "factor": 2.0})),
    "llama-yarn": ("llama-biases", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                         "original_max_position_embeddings": 128})),
}


@pytest.fixture(scope="module", params=["target", *FAMILIES, *EXTRA])
def runner(request, tmp_path_factory, load_model):
    if request.param == "target":
        model = load_model("target")
    else:
        family, overrides = EXTRA.get(request.param, (request.param, {}))
        model = load(build(family, tmp_path_factory.mktemp(request.param), **overrides))
    return LlamaRunner(model, slots=2, max_len=600)


def module(runner, positions):
    return runner.rotary(torch.empty(0, dtype=runner.dtype), positions)


def test_table_rows_are_the_modules_cos_and_sin(runner):
    assert runner._rope_by_table  # every type here depends on the position alone
    x = torch.empty(0, dtype=runner.dtype)
    far = [2047, 4095, 40_000] if runner.config.max_position_embeddings > 40_000 else []
    for p in list(range(0, 700)) + far:  # past the first 256 columns: the table grows; past max_len: the module
        position = torch.tensor([[p]])
        got, want = runner._cos_sin(x, position), module(runner, position)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), p
        flat = runner._cos_sin(x, torch.tensor([p]))  # packed positions [P]
        assert torch.equal(flat[0], want[0][0]) and torch.equal(flat[1], want[1][0]), p
    generator = torch.Generator().manual_seed(0)
    for b, t in [(1, 5), (3, 7), (4, 40), (2, 300)]:
        positions = torch.randint(0, 700, (b, t), generator=generator)
        got, want = runner._cos_sin(x, positions), module(runner, positions)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert got[0].shape == want[0].shape
    assert runner._rope_table is not None and len(runner._rope_table[0]) == runner.max_len


def test_negative_positions_go_to_the_module(runner):
    positions = torch.tensor([[-3, 0, 5]])
    got, want = runner._cos_sin(torch.empty(0, dtype=runner.dtype), positions), module(runner, positions)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_longrope_keeps_the_module(tmp_path):
    head_dim = 16
    short = [1.0 + i / 10 for i in range(head_dim // 2)]
    model = load(build("llama-biases", tmp_path / "longrope", max_position_embeddings=256, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": [2 * f for f in short],
        "original_max_position_embeddings": 64}))
    runner = LlamaRunner(model, slots=1, max_len=128)
    assert not runner._rope_by_table
    ids = torch.randint(3, 300, (1, 80), generator=torch.Generator().manual_seed(1))
    cols = torch.arange(80)[None]
    runner.forward(ids, cols, cols, causal_bias([0], [80], 80))
    assert runner._rope_table is None
    positions = torch.tensor([[3, 70]])  # past the original 64: the long factors for both
    got, want = runner._cos_sin(torch.empty(0), positions), module(runner, positions)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
