"""The draft head (training/head.py, engine/head.py): the engine's head computes what the trained head computed
(the pass the training-time test feeds its own features included), the verifier's features are the target's,
a head of another target or with unknown weights is refused, and speculation with the head -- alone and fused with
the drafters and the suffix tree -- leaves greedy and seeded sampled output unchanged."""

import pytest
import torch

from specfleet.engine.engine import Request
from specfleet.engine.factory import build_engine
from specfleet.engine.head import HeadModel, HeadProposer
from specfleet.engine.llama import causal_bias
from specfleet.engine.models import ModelSet
from specfleet.engine.proposers import Draft
from specfleet.engine.sampling import SamplingParams
from specfleet.training.head import HEAD_FILE, HEAD_INFO, TrainHead, head_config

from conftest import write_random_head


@pytest.fixture(scope="module")
def target(load_model):
    return load_model("target")


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory, target):
    return write_random_head(tmp_path_factory.mktemp("head") / "head", target)


@pytest.fixture(scope="module")
def model_set(models_dir, head_dir):
    return ModelSet.bundled(models_dir).with_overrides(head=head_dir)


def _features(target, ids):
    with torch.no_grad():
        return target.model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def test_engine_head_computes_the_trained_heads_passes(target, head_dir, models_dir):
    """Pass 0 (true features) and pass 1 (the head's own prediction at the last position, as while drafting) of the
    training module equal the engine's head runner over the same inputs, from the bf16-stored weights."""
    ids = list(range(100, 140))
    feats = _features(target, ids)  # f_0..f_39
    head = HeadModel(head_dir, target, slots=2, target_dir=models_dir / "target")
    train = TrainHead(head_config(target.config), target.model.embed_tokens.weight)
    from specfleet.training.head import read_head

    train.load_head_state(read_head(head_dir, None)[1])
    t = len(ids) - 1
    with torch.no_grad():
        passes = train.unroll(feats[None, :t], torch.tensor([ids[1:]]), passes=2)
    # the engine: pairs (f_i, x_{i+1}) for i < t in one forward, then one level fed its own prediction
    x = head.inputs(feats[:t], torch.tensor(ids[1:]))[None]
    cols = torch.arange(t)[None]
    _, hidden = head.runner.forward(torch.zeros(1, t, dtype=torch.long), cols, cols, causal_bias([0], [t], t),
                                    inputs=x, return_hidden=True)
    assert torch.allclose(hidden[0], passes[0][0], atol=1e-4)
    # pass 1 at position i = t-1: (prediction made at i-1, x_{i+1}) seeing true pairs < i and itself
    i = t - 1
    cols = torch.arange(i)[None]
    head.runner.forward(torch.zeros(1, i, dtype=torch.long), cols, cols, causal_bias([0], [i], i),
                        inputs=x[:, :i], return_hidden=True)
    fed = head.inputs(passes[0][0, i - 1][None], torch.tensor([ids[i + 1]]))[None]
    col = torch.tensor([[i]])
    _, h1 = head.runner.forward(torch.zeros(1, 1, dtype=torch.long), col, col, causal_bias([i], [1], i + 1),
                                inputs=fed, return_hidden=True)
    assert torch.allclose(h1[0, 0], passes[1][0, i], atol=1e-4)


def test_the_verifier_keeps_the_targets_features(model_set, target):
    """After prefill and several speculative rounds (accepted nodes, fed context), the features the engine hands the
    head are the target's own last hidden states of the context."""
    engine = build_engine(model_set, "head", batch_size=2, target=target, adaptive=False, k=3)
    seen = []
    proposer = engine.proposer
    original = proposer.propose

    def spy(batch):
        seen.extend((list(d.context), d.features.clone()) for d in batch if d.features is not None)
        return original(batch)

    proposer.propose = spy
    engine.generate([Request("a", list(range(200, 230)), 12), Request("b", list(range(300, 305)), 9)])
    assert len(seen) >= 6
    for context, feats in seen:
        assert feats.shape[0] == len(context) - 1
        assert torch.allclose(feats, _features(target, context[:-1]), atol=1e-4)


def test_a_head_of_another_target_is_refused(head_dir, target, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"not the bundled target")
    with pytest.raises(ValueError, match="trained for target .* retrain it"):
        HeadModel(head_dir, target, slots=1, target_dir=other)


def test_unknown_or_missing_head_weights_are_refused(head_dir, target, tmp_path, models_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(head_dir, bad)
    weights = load_file(bad / HEAD_FILE)
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(384)
    save_file(weights, bad / HEAD_FILE)
    with pytest.raises(ValueError, match="not implemented .*q_proj.bias"):
        HeadModel(bad, target, slots=1, target_dir=models_dir / "target")
    (bad / HEAD_INFO).unlink()
    with pytest.raises(FileNotFoundError, match="head.json is missing"):
        HeadModel(bad, target, slots=1)


@pytest.mark.parametrize("proposer, drafters", [("head", None), ("fused", "python,prose,c,head")])
def test_speculation_with_the_head_is_lossless(model_set, target, proposer, drafters, tokenizer, held_out_text):
    prompts = [tokenizer(text, add_special_tokens=False).input_ids[-32:] for text in held_out_text.values()]
    plain = build_engine(model_set, "none", batch_size=4, target=target)
    spec = build_engine(model_set, proposer, drafters, batch_size=4, target=target, adaptive=False, k=4)
    greedy = [Request(f"g{i}", p, 20) for i, p in enumerate(prompts)]
    sampled = [Request(f"s{i}", p, 20, params=SamplingParams(0.8, 0.95, 0, 11 + i)) for i, p in enumerate(prompts)]
    want = [r.token_ids for r in plain.generate(greedy + sampled)]
    got = spec.generate(greedy + sampled)
    assert [r.token_ids for r in got] == want
    assert sum(r.stats["draft_tokens"] for r in got) > 0  # the head did draft


def test_the_head_is_routed_like_any_drafter(model_set, target):
    """Fused with the head, a plan names the drafters that draft: the head only where named, the specialists only
    where named, and the adaptive controller ranks the head among them (credit and routing by name)."""
    from specfleet.engine.factory import build_proposer

    engine = build_engine(model_set, "fused", "python,head", batch_size=2, target=target)
    assert engine.policy.drafters == ["python", "head"]
    assert set(engine.proposer.drafters) == {"python", "head"}
    proposer = build_proposer("fused", model_set, ("python", "head"), 2, target=target)
    ids = list(range(50, 70))
    feats = _features(target, ids[:-1])
    only_head, only_python = proposer.propose([Draft("a", ids, 3, ("head",), features=feats),
                                               Draft("b", ids, 3, ("python",), features=feats)])
    assert only_head.origins and all(set(o) <= {"head", "suffix"} for o in only_head.origins)
    assert any("head" in o for o in only_head.origins)
    assert only_python.origins and all("head" not in o for o in only_python.origins)
    assert any("python" in o for o in only_python.origins)


def test_head_drafts_a_chain_with_siblings(model_set, target, models_dir):
    model = HeadModel(model_set.head, target, slots=1, target_dir=models_dir / "target")
    ids = list(range(50, 70))
    plain = HeadProposer(model, continue_siblings=False).propose([Draft("r", ids, 3, features=_features(target,
                                                                                                       ids[:-1]))])[0]
    assert len(plain) == 6 and plain.parents.tolist() == [-1, -1, 0, 0, 2, 2]  # chain + a sibling per level
    assert plain.origins == (("head",),) * 6
    # by default each level's sibling but the last gets a child (drafted beside the chain in the same forward): the
    # chain and its siblings are the same tokens, the chain first among its parent's children
    tree = HeadProposer(model).propose([Draft("r", ids, 3, features=_features(target, ids[:-1]))])[0]
    assert len(tree) == 8 and tree.parents.tolist() == [-1, -1, 1, 0, 0, 4, 3, 3]
    chain = [0, 3, 6]
    assert tree.tokens[chain].tolist() == plain.tokens[[0, 2, 4]].tolist()
    assert tree.tokens[[1, 4, 7]].tolist() == plain.tokens[[1, 3, 5]].tolist()


def test_leaves_that_do_not_earn_their_verification_are_dropped_and_retried():
    """TreeShaper: every leaf without prices (a drafter service); with prices, a role is kept while its measured
    tokens per node pay the batch's rate x a node's seconds, dropped when it does not, and drafted again one round
    in EXPLORE_EVERY so that it can come back."""
    from specfleet.engine.head import CONTINUED, TreeShaper

    free = TreeShaper({"sampled": 2, "greedy": 1}, True)
    assert free.shape("sampled") == (2, True) and free.shape("greedy") == (1, True)
    prices = [(300.0, 4e-4, 1e-4)]  # a node must earn 0.12 tokens (0.15 for a continued child: its head row too)
    shaper = TreeShaper({"sampled": 2}, True, pricing=lambda: prices[0])
    assert shaper.shape("sampled") == (2, True)  # the optimistic prior: tried first
    roles = [0, 1, 2, 0, 1, 2, CONTINUED]
    for i in range(40):  # rank-1 siblings accepted in one round of two, rank 2 in one of 20, continued never
        shaper.credit("sampled", roles, [0, 1])
        shaper.credit("sampled", roles, [0, 3] if i % 10 else [2])
    assert shaper.value("sampled", 1) > 0.2 and 0.01 < shaper.value("sampled", 2) < 0.05
    shapes = [shaper.shape("sampled") for _ in range(TreeShaper.EXPLORE_EVERY)]
    assert shapes.count((1, False)) == TreeShaper.EXPLORE_EVERY - 1 and shapes.count((2, True)) == 1
    prices[0] = (300.0, 1e-5, 1e-5)  # verification nearly free (a GPU, a flat CPU forward): rank 2 pays again
    assert shaper.shape("sampled") == (2, False)


def test_the_head_credits_the_leaves_on_the_accepted_path(model_set, target, models_dir):
    """observe_accepted walks the accepted tokens down the head's own last tree (its node order need not be the
    tree the verifier saw: a merged tree reorders and deduplicates) and credits the roles it passes."""
    from specfleet.engine.head import CONTINUED

    model = HeadModel(model_set.head, target, slots=1, target_dir=models_dir / "target")
    ids = list(range(50, 70))
    proposer = HeadProposer(model)
    tree = proposer.propose([Draft("r", ids, 3, features=_features(target, ids[:-1]))])[0]
    assert tree.parents.tolist() == [-1, -1, 1, 0, 0, 4, 3, 3]  # chain 0, 3, 6; siblings 1, 4, 7; continued 2, 5
    before = {role: proposer.shaper.value("greedy", role) for role in (1, CONTINUED)}
    proposer.observe_accepted("r", tree.tokens[[1, 2]].tolist())  # the first sibling and its continued child
    assert proposer.shaper.value("greedy", 1) > before[1] and proposer.shaper.value("greedy", CONTINUED) > before[
        CONTINUED]
    assert "r" not in proposer.drafted  # credited once
    proposer.propose([Draft("r", ids, 3, features=_features(target, ids[:-1]))])
    after = proposer.shaper.value("greedy", 1)
    proposer.observe_accepted("r", tree.tokens[[0, 3]].tolist())  # the chain only: its siblings earned nothing
    assert proposer.shaper.value("greedy", 1) < after


def test_bundled_models_folder_names_the_head_only_when_present(models_dir):
    bundled = ModelSet.bundled(models_dir)
    assert bundled.head == (models_dir / "head" if (models_dir / "head" / HEAD_INFO).exists() else None)


def test_the_profile_times_the_head_against_a_target_step(model_set):
    from specfleet.engine.profile import _head_steps

    rows = _head_steps(model_set, repeats=1)
    assert [r["batch"] for r in rows] and all(r["ms"] > 0 and r["vs_target"] > 0 for r in rows)


class _Oracle:
    """A drafter that knows the continuation: drafts it exactly (or wrongly from depth `wrong_from` on)."""

    def __init__(self, continuation, prompt_len, wrong_from=99):
        self.continuation, self.p, self.wrong_from = continuation, prompt_len, wrong_from
        self.released = []

    def __call__(self, rids, contexts, features, k, seeds, positions):
        out = []
        for rid, context, feats, pos in zip(rids, contexts, features, positions, strict=True):
            assert len(feats) == len(context) - 1 and pos == len(context) - self.p
            b = int(rid.rsplit("-", 1)[1])
            chain = self.continuation[b, pos:pos + k].tolist()
            out.append([t if d < self.wrong_from else -1 for d, t in enumerate(chain)])
        return out

    def release(self, rids):
        self.released += rids


def test_head_rounds_are_simulated_round_by_round(target):
    from specfleet.training.acceptance import head_cell

    prompts = torch.randint(0, 8000, (2, 8))
    continuation = torch.randint(0, 8000, (2, 20))
    perfect = _Oracle(continuation, 8)
    cell = head_cell(perfect, target, prompts, continuation, k=4, tag="t-")
    assert cell["tokens_per_round"] == 5.0 and cell["accepted_per_round"] == 4.0  # 20 tokens: 4 rounds of 4 drafts + 1
    assert sorted(perfect.released) == ["t-0", "t-1"]
    first_only = head_cell(_Oracle(continuation, 8, wrong_from=1), target, prompts, continuation, k=4, tag="t-")
    assert first_only["tokens_per_round"] == 2.0 and first_only["top1_agreement"] == 1.0


def _with_vocab(head_dir, out, vocab):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(head_dir, out)
    weights = load_file(out / HEAD_FILE)
    weights["draft_vocab"] = vocab
    save_file(weights, out / HEAD_FILE)
    return out


def test_a_draft_vocabulary_drafts_only_its_tokens_and_stays_lossless(head_dir, target, tmp_path, models_dir,
                                                                      model_set, tokenizer, held_out_text):
    """EAGLE-3's reduced vocabulary: the head's LM head keeps the rows of the stored ids; its drafts come only from
    them (greedy and sampled), speculation still gives the target's own output, and a malformed one is refused."""
    vocab = torch.arange(0, 8192, 3)  # every third id: a vocabulary the drafts visibly respect
    small = _with_vocab(head_dir, tmp_path / "small", vocab)
    model = HeadModel(small, target, slots=2, target_dir=models_dir / "target")
    assert model.runner.lm_head.shape[0] == len(vocab)
    proposer = HeadProposer(model)
    ids = list(range(50, 70))
    feats = _features(target, ids[:-1])
    greedy, sampled = proposer.propose([Draft("g", ids, 3, features=feats),
                                        Draft("s", ids, 3, params=SamplingParams(0.8, 0.95, 0, 5), seed=5,
                                              features=feats)])
    for tree in (greedy, sampled):
        assert len(tree) and all(t % 3 == 0 for t in tree.tokens.tolist())
    prompts = [tokenizer(text, add_special_tokens=False).input_ids[-32:] for text in held_out_text.values()]
    plain = build_engine(model_set, "none", batch_size=4, target=target)
    spec = build_engine(model_set.with_overrides(head=small), "head", batch_size=4, target=target, adaptive=False)
    requests = [Request(f"g{i}", p, 12) for i, p in enumerate(prompts)]
    requests += [Request(f"s{i}", p, 12, params=SamplingParams(0.8, 0.95, 0, 3 + i)) for i, p in enumerate(prompts)]
    assert [r.token_ids for r in spec.generate(requests)] == [r.token_ids for r in plain.generate(requests)]
    for bad in (torch.tensor([5, 3, 9]), torch.tensor([1, 8192]), torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="draft_vocab must be"):
            HeadModel(_with_vocab(head_dir, tmp_path / f"bad{len(list(tmp_path.iterdir()))}", bad), target, slots=1)


def test_the_draft_vocabulary_is_the_most_frequent_training_tokens(tmp_path):
    import numpy as np

    from specfleet.training.head import draft_vocabulary, vocabulary_coverage

    tokens = tmp_path / "tokens"
    tokens.mkdir()
    np.array([7, 7, 7, 9, 9, 4, 2], dtype=np.uint16).tofile(tokens / "python.train.bin")
    np.array([9, 7, 4], dtype=np.uint16).tofile(tokens / "prose.train.bin")
    np.array([7, 9, 5, 5], dtype=np.uint16).tofile(tokens / "python.val.bin")
    assert draft_vocabulary(tokens, 2).tolist() == [7, 9]  # 4 x 7, 3 x 9, 2 x 4
    assert draft_vocabulary(tokens, 3, always=(0,)).tolist() == [0, 7, 9]
    assert vocabulary_coverage(tokens, torch.tensor([7, 9])) == {"python": 0.5}


def test_the_head_vocab_command_compares_sizes_side_by_side(models_dir, target, tmp_path, capsys):
    """`specfleet models head-vocab`: the full vocabulary and each size, measured in one run, written as JSON."""
    import json

    import numpy as np

    from specfleet.cli.main import main

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "target").symlink_to(models_dir / "target")
    write_random_head(folder / "head", target)
    tokens = tmp_path / "data" / "tokens"
    tokens.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for domain in ("python", "prose", "c"):
        for split in ("train", "val"):
            rng.integers(0, 600, 3000, dtype=np.uint16).tofile(tokens / f"{domain}.{split}.bin")
    out = tmp_path / "head-vocab.json"
    assert main(["models", "head-vocab", "--models", str(folder), "--data-dir", str(tmp_path / "data"),
                 "--sizes", "512", "--prompts", "2", "--new-tokens", "6", "--repeats", "2",
                 "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"full", "512"} and rows["full"]["coverage"] is None
    assert 0.8 < rows["512"]["coverage"]["python"] < 0.9  # 512 of the 600 ids drawn
    for row in rows.values():
        assert set(row["greedy_tokens_per_round"]) == set(row["sampled_tokens_per_round"]) == {"python", "prose", "c"}
        assert row["step_ms"] > 0 and row["step_vs_target"] > 0
    with pytest.raises(SystemExit, match="below the target's vocabulary"):
        main(["models", "head-vocab", "--models", str(folder), "--data-dir", str(tmp_path / "data"),
              "--sizes", "9000", "--output", str(out)])


def test_the_model_card_names_the_heads_draft_vocabulary(tmp_path):
    import json

    from specfleet.training.cards import _head_card

    (tmp_path / "head").mkdir()
    info = {"target_fingerprint": "abc", "parameters": 10, "tokens_seen": 5, "train_seconds": 60,
            "draft_vocab": {"size": 4096, "validation_coverage": {"python": 0.947, "c": 0.9645}}}
    (tmp_path / "head" / "head.json").write_text(json.dumps(info))
    card = "\n".join(_head_card(tmp_path))
    assert "the 4,096 most frequent training tokens" in card and "python 94.7%, c 96.5%" in card
